"""Hopper (sm90) fused attention through Pallas' Mosaic GPU lowering: forward and backward.

Same contract as `attention.flash_attention` (q float[B, T, N, H], k/v float[B, S, K, H],
segment ids, causal, GQA) for bf16/fp16 and H in {64, 128, 256}; `attention.py` dispatches
here on sm90+ and keeps the Triton kernels for everything else (float32 included: wgmma
multiplies 16-bit operands only).

Structure, after FlashAttention-3 (Shah et al. 2024): every CTA runs `n_wg` consumer
warpgroups, each owning 64 rows, plus one producer warpgroup that streams the other operand
block by block through a `stages`-deep ring of SMEM buffers with TMA copies and mbarriers
(`ready` per buffer; `consumed` per slot, which every consumer arrives on). Both matmuls of
a step are `wgmma` (S = Q K^T with K^T a transposed SMEM view; P V with P from registers);
the online softmax runs on the wgmma accumulator layout in base 2 (exp2 with the scale and
log2(e) folded into one multiply).

  forward  grid (N, T/128, B)      2 x 64 query rows, K/V blocks of 128 (64 when H = 256)
  dQ       grid (N, T/(64 n), B)   n x 64 query rows (n = 2; 1 when H = 256), K/V blocks
                                   of 64
  dK, dV   grid (K, S/(64 n), B)   n x 64 key rows (n = 2; 1 when H = 256), Q/dO blocks of
                                   64 over all N/K query heads of the group: no GQA reduction

Skipping: the wrapper computes, per row tile, the range [lo, hi) of column blocks that
can be visible (the causal bound, and segment-id ranges that meet: packed rows skip the
blocks of other samples); producer and consumers walk the same range, so nothing outside
it is loaded or multiplied. Inside the range, blocks that straddle the diagonal get the
causal mask, and the segment mask applies whenever segments (or a ragged S) exist.
Ragged T and S are padded to multiples of 128 with segment ids that match nothing.

CPU: Mosaic GPU's interpreter (jax 0.10/0.11, `compat.mgpu_interpret_params`) runs these
kernels (threads, barriers, TMA copies) but not `wgmma` with a transposed or register
operand, nor `plgpu` layout casts; in interpret mode `_Ops` swaps exactly those for
`lax.dot_general` on the same SMEM tiles and plain jnp. The compiled path is checked by
lowering for CUDA on CPU and by the gpu-marked tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from mm_jax.kernels import compat
from mm_jax.kernels.compat import pl

MASK = -1e30  # finite: rows that see no key keep m = MASK and never compute inf - inf
Q_PAD, KV_PAD = -1, -2  # padding segment ids: they match nothing
LOG2E = math.log2(math.e)
ROWS = 64  # rows per consumer warpgroup: the wgmma M tile
PAD = 128  # T and S are padded to this multiple: every tile below divides it
HEAD_DIMS = (64, 128, 256)  # multiples of the 64-element (128-byte) swizzle
DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static tile sizes of the three kernels for one head dim (SMEM fits in 228 KiB)."""

  h: int
  fwd_kv: int  # K/V block of the forward
  dq_kv: int = 64  # K/V block of the dQ kernel
  dkv_q: int = 64  # Q/dO block of the dK/dV kernel
  dq_wg: int = 2  # consumer warpgroups of the dQ kernel
  dkv_wg: int = 2  # consumer warpgroups of the dK/dV kernel
  stages: int = 2

  @classmethod
  def for_head_dim(cls, h: int) -> Plan:
    # H = 256: 128-row K/V blocks would need 320 KiB of SMEM in the forward, and two dQ or
    # dK/dV warpgroups 256 KiB; halve them.
    return cls(h, fwd_kv=64, dq_wg=1, dkv_wg=1) if h == 256 else cls(h, fwd_kv=128)


def unsupported(q, k, v) -> str | None:
  """Why the Mosaic GPU kernels cannot run these inputs (None: they can)."""
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in map(jnp.dtype, DTYPES):
    return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: wgmma needs bf16 or fp16"
  if q.shape[-1] not in HEAD_DIMS:
    return f"head dim {q.shape[-1]} not in {HEAD_DIMS}"
  return compat.mosaic_gpu_missing()


# ----------------------------------------------------------------------------- ops


@dataclasses.dataclass(frozen=True)
class _Ops:
  """The few kernel ops the Mosaic GPU interpreter cannot run, with interpret fallbacks."""

  interpret: bool

  def mm(self, a, b, *, trans_b=False, acc=None):
    """acc + a @ b (or a @ b^T), float32; a an SMEM ref or a register array, b an SMEM ref."""
    if self.interpret:
      a = a if isinstance(a, jax.Array) else a[...]
      dims = (((1,), (1,) if trans_b else (0,)), ((), ()))
      out = lax.dot_general(a, b[...], dims, preferred_element_type=jnp.float32)
      return out if acc is None else acc + out
    plgpu = compat.plgpu
    b = plgpu.transpose_ref(b, (1, 0)) if trans_b else b
    if acc is None:
      n = b.shape[1]

      def fresh(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

      return pl.run_scoped(fresh, plgpu.ACC((a.shape[0], n), jnp.float32))

    def accumulate(acc_ref):
      plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(accumulate)(plgpu.ACC.init(acc))

  def full(self, shape, value, reduce=None):
    """A constant in the wgmma accumulator layout (reduced over `reduce` for vectors)."""
    x = jnp.full(shape, value, jnp.float32)
    if self.interpret:
      return x
    layout = compat.plgpu.Layout.WGMMA
    return compat.plgpu.layout_cast(x, layout if reduce is None else layout.reduce(reduce))

  def iota(self, shape, dim):
    if self.interpret:
      return lax.broadcasted_iota(jnp.int32, shape, dim)
    return compat.plgpu.broadcasted_iota(jnp.int32, shape, dim,
                                         layout=compat.plgpu.Layout.WGMMA)

  def vector(self, ref, reduce):
    """An SMEM vector as the rows (reduce=1) or columns (reduce=0) of an accumulator."""
    if self.interpret:
      return ref[...]
    return compat.plgpu.load(ref, (), layout=compat.plgpu.Layout.WGMMA.reduce(reduce))


def _bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


def _mask(ops, shape, *, row_seg, col_seg, row0, col0, causal, rows_are_queries):
  """bool[shape] of visible (row, column) pairs, or None when every pair is visible."""
  mask = None
  if row_seg is not None:
    mask = _bcast(row_seg, shape, 0) == _bcast(col_seg, shape, 1)
  if causal:
    rows = ops.iota(shape, 0) + row0
    cols = ops.iota(shape, 1) + col0
    vis = rows >= cols if rows_are_queries else rows <= cols
    mask = vis if mask is None else mask & vis
  return mask


def _scratch(shape, dtype, swizzled=True):
  plgpu = compat.plgpu
  if not swizzled:
    return plgpu.SMEM(shape, dtype)
  # 128-byte swizzle over (8, 64) tiles: the layout wgmma reads without bank conflicts.
  tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  return plgpu.SMEM(shape, dtype, transforms=tr)


def _produce(n_steps, stages, consumed, issue):
  """Producer warpgroup: fills the ring of `stages` buffers, refilling a slot once every
  consumer has arrived on its `consumed` barrier; `issue(step, slot)` starts the copies."""
  for s in range(stages):
    pl.when(s < n_steps)(functools.partial(issue, s, s))

  def refill(s, _):
    slot = lax.rem(s, stages)
    compat.plgpu.barrier_wait(consumed.at[slot])
    issue(s, slot)

  lax.fori_loop(stages, n_steps, refill, None)

  # Observe the last release of every slot too: the kernel then ends with no barrier phase
  # unobserved, which the interpreter checks (and which costs the idle producer nothing).
  def drain(s, _):
    compat.plgpu.barrier_wait(consumed.at[lax.rem(s, stages)])

  lax.fori_loop(jnp.maximum(n_steps - stages, 0), n_steps, drain, None)


def _roles(n_wg, compute, produce):
  """Runs `compute(wg)` on warpgroups [0, n_wg) and `produce()` on warpgroup n_wg."""
  plgpu = compat.plgpu
  wg = lax.axis_index("wg")

  @pl.when(wg < n_wg)
  def _():
    if n_wg == 2:  # FA3's register split: 2 x 232 + 40 fits 3 x 128 threads' 64K regs
      plgpu.set_max_registers(232, action="increase")
    compute(wg)

  @pl.when(wg == n_wg)
  def _():
    if n_wg == 2:
      plgpu.set_max_registers(40, action="decrease")
    produce()


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, lo_ref, hi_ref, o_ref, lse_ref,
                q_s, k_s, v_s, qseg_s, kseg_s, lse_s, q_bar, k_bar, v_bar, consumed, *,
                plan, group, c, causal, masked, n_tiles, ops):
  """One (head, 128 query rows, batch): online softmax over the visible K/V blocks."""
  plgpu = compat.plgpu
  n, b = lax.axis_index("n"), lax.axis_index("b")
  # Causal: the longest rows (last tiles) start first, so short ones fill the tail.
  i = n_tiles - 1 - lax.axis_index("i") if causal else lax.axis_index("i")
  bk, st = plan.fwd_kv, plan.stages
  lo, hi = lo_ref[b, i], hi_ref[b, i]

  def compute(wg):
    row0 = i * 2 * ROWS + wg * ROWS
    rows = pl.ds(row0, ROWS)
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], q_s.at[wg], q_bar.at[wg])
    if masked:
      plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_s.at[wg], q_bar.at[wg + 2])
      plgpu.barrier_wait(q_bar.at[wg + 2])
    plgpu.barrier_wait(q_bar.at[wg])
    q_seg = ops.vector(qseg_s.at[wg], 1) if masked else None

    def step(j, carry, diagonal):
      acc, m, den = carry
      slot = lax.rem(j - lo, st)
      plgpu.barrier_wait(k_bar.at[slot])
      s = ops.mm(q_s.at[wg], k_s.at[slot], trans_b=True) * c
      k_seg = None
      if masked:
        plgpu.barrier_wait(k_bar.at[slot + st])
        k_seg = ops.vector(kseg_s.at[slot], 0)
      mask = _mask(ops, s.shape, row_seg=q_seg, col_seg=k_seg, row0=row0, col0=j * bk,
                   causal=diagonal, rows_are_queries=True)
      if mask is not None:
        s = jnp.where(mask, s, MASK)
      m_new = jnp.maximum(m, s.max(axis=1))
      p = jnp.exp2(s - _bcast(m_new, s.shape, 0))
      if mask is not None:
        p = jnp.where(mask, p, 0.0)  # rows with no visible key yet have m_new = MASK
      alpha = jnp.exp2(m - m_new)
      den = den * alpha + p.sum(axis=1)
      acc = acc * _bcast(alpha, acc.shape, 0)
      plgpu.barrier_wait(v_bar.at[slot])
      acc = ops.mm(p.astype(q_s.dtype), v_s.at[slot], acc=acc)
      plgpu.barrier_arrive(consumed.at[slot])
      return acc, m_new, den

    def body(diagonal):
      return lambda j, carry: step(j, carry, diagonal)

    carry = (ops.full((ROWS, plan.h), 0.0), ops.full((ROWS,), MASK, 1),
             ops.full((ROWS,), 0.0, 1))
    # Blocks left of the diagonal need no causal mask: all their keys precede every query.
    cut = jnp.clip(lax.div(i * 2 * ROWS, bk), lo, hi) if causal else hi
    carry = lax.fori_loop(lo, cut, body(False), carry)
    acc, m, den = lax.fori_loop(cut, hi, body(causal), carry)
    den = jnp.where(den == 0.0, 1.0, den)  # rows that see no key output 0
    q_s.at[wg][...] = (acc / _bcast(den, acc.shape, 0)).astype(q_s.dtype)
    lse_s.at[wg][...] = m + jnp.log(den) * LOG2E  # base 2, like m
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_s.at[wg], o_ref.at[b, rows, n])
    plgpu.copy_smem_to_gmem(lse_s.at[wg], lse_ref.at[b, n, rows])
    plgpu.wait_smem_to_gmem(0)

  def produce():
    kh = lax.div(n, group)

    def issue(s, slot):
      cols = pl.ds((lo + s) * bk, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kh], k_s.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kh], v_s.at[slot], v_bar.at[slot])
      if masked:
        plgpu.copy_gmem_to_smem(kseg_ref.at[b, cols], kseg_s.at[slot], k_bar.at[slot + st])

    _produce(hi - lo, st, consumed, issue)

  _roles(2, compute, produce)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, lo_ref,
               hi_ref, dq_ref, q_s, do_s, k_s, v_s, vec_s, qseg_s, kseg_s, q_bar, k_bar, v_bar,
               consumed, *, plan, group, c, scale, causal, masked, n_tiles, ops):
  """One (head, 128 query rows, batch): dQ = scale * sum_j dS_j K_j over visible blocks."""
  plgpu = compat.plgpu
  n, b = lax.axis_index("n"), lax.axis_index("b")
  i = n_tiles - 1 - lax.axis_index("i") if causal else lax.axis_index("i")
  bk, st, n_wg = plan.dq_kv, plan.stages, plan.dq_wg
  lo, hi = lo_ref[b, i], hi_ref[b, i]

  def compute(wg):
    row0 = i * n_wg * ROWS + wg * ROWS
    rows = pl.ds(row0, ROWS)
    loads = [(q_ref.at[b, rows, n], q_s.at[wg]), (do_ref.at[b, rows, n], do_s.at[wg]),
             (lse_ref.at[b, n, rows], vec_s.at[wg, 0]),
             (delta_ref.at[b, n, rows], vec_s.at[wg, 1])]
    for x, (src, dst) in enumerate(loads):
      plgpu.copy_gmem_to_smem(src, dst, q_bar.at[wg * 5 + x])
    if masked:
      plgpu.copy_gmem_to_smem(qseg_ref.at[b, rows], qseg_s.at[wg], q_bar.at[wg * 5 + 4])
    for x in range(5 if masked else 4):
      plgpu.barrier_wait(q_bar.at[wg * 5 + x])
    lse, delta = ops.vector(vec_s.at[wg, 0], 1), ops.vector(vec_s.at[wg, 1], 1)
    q_seg = ops.vector(qseg_s.at[wg], 1) if masked else None

    def step(j, dq, diagonal):
      slot = lax.rem(j - lo, st)
      plgpu.barrier_wait(k_bar.at[slot])
      s = ops.mm(q_s.at[wg], k_s.at[slot], trans_b=True) * c
      p = jnp.exp2(s - _bcast(lse, s.shape, 0))
      k_seg = None
      if masked:
        plgpu.barrier_wait(k_bar.at[slot + st])
        k_seg = ops.vector(kseg_s.at[slot], 0)
      mask = _mask(ops, s.shape, row_seg=q_seg, col_seg=k_seg, row0=row0, col0=j * bk,
                   causal=diagonal, rows_are_queries=True)
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      plgpu.barrier_wait(v_bar.at[slot])
      dp = ops.mm(do_s.at[wg], v_s.at[slot], trans_b=True)
      ds = p * (dp - _bcast(delta, dp.shape, 0))
      dq = ops.mm(ds.astype(q_s.dtype), k_s.at[slot], acc=dq)
      plgpu.barrier_arrive(consumed.at[slot])
      return dq

    cut = jnp.clip(lax.div(i * n_wg * ROWS, bk), lo, hi) if causal else hi
    dq = lax.fori_loop(lo, cut, lambda j, d: step(j, d, False), ops.full((ROWS, plan.h), 0.0))
    dq = lax.fori_loop(cut, hi, lambda j, d: step(j, d, causal), dq)
    q_s.at[wg][...] = (dq * scale).astype(q_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_s.at[wg], dq_ref.at[b, rows, n])
    plgpu.wait_smem_to_gmem(0)

  def produce():
    kh = lax.div(n, group)

    def issue(s, slot):
      cols = pl.ds((lo + s) * bk, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[b, cols, kh], k_s.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, cols, kh], v_s.at[slot], v_bar.at[slot])
      if masked:
        plgpu.copy_gmem_to_smem(kseg_ref.at[b, cols], kseg_s.at[slot], k_bar.at[slot + st])

    _produce(hi - lo, st, consumed, issue)

  _roles(n_wg, compute, produce)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, lo_ref,
                hi_ref, dk_ref, dv_ref, k_s, v_s, kseg_s, q_s, do_s, vec_s, qseg_s, kv_bar,
                ready, consumed, *, plan, group, c, scale, causal, masked, ops):
  """One (kv head, n_wg x 64 key rows, batch): dK and dV summed over the group's heads."""
  plgpu = compat.plgpu
  kh, b, t = lax.axis_index("n"), lax.axis_index("b"), lax.axis_index("i")
  bq, st, n_wg = plan.dkv_q, plan.stages, plan.dkv_wg
  lo, hi = lo_ref[b, t], hi_ref[b, t]
  n_q = hi - lo

  def compute(wg):
    row0 = t * n_wg * ROWS + wg * ROWS
    rows = pl.ds(row0, ROWS)
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kh], k_s.at[wg], kv_bar.at[wg * 3])
    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kh], v_s.at[wg], kv_bar.at[wg * 3 + 1])
    if masked:
      plgpu.copy_gmem_to_smem(kseg_ref.at[b, rows], kseg_s.at[wg], kv_bar.at[wg * 3 + 2])
    for x in range(3 if masked else 2):
      plgpu.barrier_wait(kv_bar.at[wg * 3 + x])
    k_seg = ops.vector(kseg_s.at[wg], 1) if masked else None

    def step(g, i, carry, diagonal):
      dk, dv = carry
      slot = lax.rem(g * n_q + i - lo, st)
      for x in range(5 if masked else 4):
        plgpu.barrier_wait(ready.at[slot * 5 + x])
      st_ = ops.mm(k_s.at[wg], q_s.at[slot], trans_b=True) * c  # S^T: [keys, queries]
      lse, delta = ops.vector(vec_s.at[slot, 0], 0), ops.vector(vec_s.at[slot, 1], 0)
      p = jnp.exp2(st_ - _bcast(lse, st_.shape, 1))
      q_seg = ops.vector(qseg_s.at[slot], 0) if masked else None
      mask = _mask(ops, p.shape, row_seg=k_seg, col_seg=q_seg, row0=row0, col0=i * bq,
                   causal=diagonal, rows_are_queries=False)
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dv = ops.mm(p.astype(k_s.dtype), do_s.at[slot], acc=dv)
      dp = ops.mm(v_s.at[wg], do_s.at[slot], trans_b=True)
      ds = p * (dp - _bcast(delta, dp.shape, 1))
      dk = ops.mm(ds.astype(k_s.dtype), q_s.at[slot], acc=dk)
      plgpu.barrier_arrive(consumed.at[slot])
      return dk, dv

    # Query blocks that start before this tile's last key straddle the diagonal.
    tile_end = (t + 1) * n_wg * ROWS
    cut = jnp.clip(lax.div(tile_end - 1 + bq - 1, bq), lo, hi) if causal else lo

    def head(g, carry):
      carry = lax.fori_loop(lo, cut, lambda i, cr: step(g, i, cr, causal), carry)
      return lax.fori_loop(cut, hi, lambda i, cr: step(g, i, cr, False), carry)

    zeros = ops.full((ROWS, plan.h), 0.0)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    k_s.at[wg][...] = (dk * scale).astype(k_s.dtype)
    v_s.at[wg][...] = dv.astype(v_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_s.at[wg], dk_ref.at[b, rows, kh])
    plgpu.copy_smem_to_gmem(v_s.at[wg], dv_ref.at[b, rows, kh])
    plgpu.wait_smem_to_gmem(0)

  def produce():
    def issue(s, slot):
      g, i = lax.div(s, n_q), lo + lax.rem(s, n_q)
      n, cols = kh * group + g, pl.ds(i * bq, bq)
      loads = [(q_ref.at[b, cols, n], q_s.at[slot]), (do_ref.at[b, cols, n], do_s.at[slot]),
               (lse_ref.at[b, n, cols], vec_s.at[slot, 0]),
               (delta_ref.at[b, n, cols], vec_s.at[slot, 1])]
      if masked:
        loads.append((qseg_ref.at[b, cols], qseg_s.at[slot]))
      for x, (src, dst) in enumerate(loads):
        plgpu.copy_gmem_to_smem(src, dst, ready.at[slot * 5 + x])

    _produce(group * n_q, st, consumed, issue)

  _roles(n_wg, compute, produce)


# ----------------------------------------------------------------------------- calls


def _ranges(row_seg, col_seg, row_tile, col_blk, causal, rows_are_queries):
  """int32[B, rows / row_tile] lo, hi: the column blocks a row tile may see.

  A block is visible if the segment-id ranges of the tile and the block meet and, when
  causal, some key precedes some query. Blocks between lo and hi that are not visible are
  still visited (the mask zeroes them): exact for packed rows, whose ids only grow.
  """
  b = row_seg.shape[0]
  r = row_seg.reshape(b, -1, row_tile)
  k = col_seg.reshape(b, -1, col_blk)
  ok = ((r.min(-1)[:, :, None] <= k.max(-1)[:, None, :])
        & (k.min(-1)[:, None, :] <= r.max(-1)[:, :, None]))
  if causal:
    ri = jnp.arange(r.shape[1])[:, None]
    ci = jnp.arange(k.shape[1])[None, :]
    if rows_are_queries:  # first key of the block <= last query of the tile
      ok &= ci * col_blk <= (ri + 1) * row_tile - 1
    else:  # last query of the block >= first key of the tile
      ok &= (ci + 1) * col_blk - 1 >= ri * row_tile
  seen = ok.any(-1)
  lo = jnp.argmax(ok, -1)
  hi = ok.shape[-1] - jnp.argmax(ok[..., ::-1], -1)
  return (jnp.where(seen, lo, 0).astype(jnp.int32), jnp.where(seen, hi, 0).astype(jnp.int32))


def _call(body, name, args, out_type, scratch, grid, n_wg, interpret):
  body = functools.partial(body, ops=_Ops(interpret))
  body.__name__ = name  # the kernel's name in profiles
  return compat.plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid,
      grid_names=("n", "i", "b"), num_threads=n_wg + 1, thread_name="wg",
      compiler_params=compat.mgpu_params(),
      interpret=compat.mgpu_interpret_params() if interpret else None)(*args)


def _fwd_call(q, k, v, qseg, kseg, lo, hi, *, causal, scale, masked, plan, interpret):
  b, tp, n, h = q.shape
  f32, i32 = jnp.float32, jnp.int32
  st, bk = plan.stages, plan.fwd_kv
  barrier = compat.plgpu.Barrier
  scratch = [_scratch((2, ROWS, h), q.dtype), _scratch((st, bk, h), q.dtype),
             _scratch((st, bk, h), q.dtype), _scratch((2, ROWS), i32, False),
             _scratch((st, bk), i32, False), _scratch((2, ROWS), f32, False),
             barrier(num_barriers=4), barrier(num_barriers=2 * st), barrier(num_barriers=st),
             barrier(num_arrivals=2, num_barriers=st)]
  body = functools.partial(_fwd_kernel, plan=plan, group=n // k.shape[2], c=scale * LOG2E,
                           causal=causal, masked=masked, n_tiles=tp // (2 * ROWS))
  out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, tp), f32)]
  return _call(body, "attention_mgpu_fwd", (q, k, v, qseg, kseg, lo, hi), out_type, scratch,
               (n, tp // (2 * ROWS), b), 2, interpret)


def _bwd_calls(q, k, v, do, lse, delta, qseg, kseg, *, causal, scale, masked, plan,
               interpret):
  b, tp, n, h = q.shape
  sp, kh = k.shape[1], k.shape[2]
  f32, i32 = jnp.float32, jnp.int32
  st, barrier = plan.stages, compat.plgpu.Barrier
  args = (q, k, v, do, lse, delta, qseg, kseg)
  common = dict(plan=plan, group=n // kh, c=scale * LOG2E, scale=scale, causal=causal,
                masked=masked)

  bk, n_wg = plan.dq_kv, plan.dq_wg
  scratch = [_scratch((n_wg, ROWS, h), q.dtype), _scratch((n_wg, ROWS, h), q.dtype),
             _scratch((st, bk, h), q.dtype), _scratch((st, bk, h), q.dtype),
             _scratch((n_wg, 2, ROWS), f32, False), _scratch((n_wg, ROWS), i32, False),
             _scratch((st, bk), i32, False), barrier(num_barriers=5 * n_wg),
             barrier(num_barriers=2 * st), barrier(num_barriers=st),
             barrier(num_arrivals=n_wg, num_barriers=st)]
  lo, hi = _ranges(qseg, kseg, n_wg * ROWS, bk, causal, True)
  n_tiles = tp // (n_wg * ROWS)
  body = functools.partial(_dq_kernel, n_tiles=n_tiles, **common)
  dq = _call(body, "attention_mgpu_dq", (*args, lo, hi), jax.ShapeDtypeStruct(q.shape, q.dtype),
             scratch, (n, n_tiles, b), n_wg, interpret)

  bq, n_wg = plan.dkv_q, plan.dkv_wg
  scratch = [_scratch((n_wg, ROWS, h), k.dtype), _scratch((n_wg, ROWS, h), k.dtype),
             _scratch((n_wg, ROWS), i32, False), _scratch((st, bq, h), q.dtype),
             _scratch((st, bq, h), q.dtype), _scratch((st, 2, bq), f32, False),
             _scratch((st, bq), i32, False), barrier(num_barriers=3 * n_wg),
             barrier(num_barriers=5 * st), barrier(num_arrivals=n_wg, num_barriers=st)]
  lo, hi = _ranges(kseg, qseg, n_wg * ROWS, bq, causal, False)
  body = functools.partial(_dkv_kernel, **common)
  kv_type = jax.ShapeDtypeStruct(k.shape, k.dtype)
  dk, dv = _call(body, "attention_mgpu_dkv", (*args, lo, hi), [kv_type, kv_type], scratch,
                 (kh, sp // (n_wg * ROWS), b), n_wg, interpret)
  return dq, dk, dv


# ----------------------------------------------------------------------------- API


def _pad(x, axis, value=0):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, (-x.shape[axis]) % PAD)
  return jnp.pad(x, widths, constant_values=value)


def _prepare(q, k, v, seg):
  """Pads T and S to multiples of PAD; segment ids int32[B, T_pad], int32[B, S_pad]."""
  t, s = q.shape[1], k.shape[1]
  qseg, kseg = _pad(seg[:, :t], 1, Q_PAD), _pad(seg[:, :s], 1, KV_PAD)
  return _pad(q, 1), _pad(k, 1), _pad(v, 1), qseg, kseg


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _attention(q, k, v, seg, causal, scale, masked, plan, interpret):
  return _attention_fwd(q, k, v, seg, causal, scale, masked, plan, interpret)[0]


def _attention_fwd(q, k, v, seg, causal, scale, masked, plan, interpret):
  qp, kp, vp, qseg, kseg = _prepare(q, k, v, seg)
  lo, hi = _ranges(qseg, kseg, 2 * ROWS, plan.fwd_kv, causal, True)
  out, lse = _fwd_call(qp, kp, vp, qseg, kseg, lo, hi, causal=causal, scale=scale,
                       masked=masked, plan=plan, interpret=interpret)
  out = out[:, : q.shape[1]]
  return out, (q, k, v, seg, out, lse)


def _attention_bwd(causal, scale, masked, plan, interpret, res, do):
  q, k, v, seg, out, lse = res
  qp, kp, vp, qseg, kseg = _prepare(q, k, v, seg)
  # delta_t = sum_h o_th do_th: the softmax-gradient row term both kernels share.
  delta = _pad(jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32),
                          do.astype(jnp.float32)), 2)
  dq, dk, dv = _bwd_calls(qp, kp, vp, _pad(do, 1), lse, delta, qseg, kseg, causal=causal,
                          scale=scale, masked=masked, plan=plan, interpret=interpret)
  t, s = q.shape[1], k.shape[1]
  return dq[:, :t], dk[:, :s], dv[:, :s], None


_attention.defvjp(_attention_fwd, _attention_bwd)


def mgpu_attention(q, k, v, seg, *, causal: bool, scale: float, has_segments: bool,
                   plan: Plan | None = None, interpret: bool = False):
  """Fused attention float[B, T, N, H] on Hopper; `seg` int32[B, max(T, S)] as in
  `attention.flash_attention` (all zeros when there are no segments). `plan` overrides the
  tile sizes (tests use short blocks to walk the buffer ring on short rows)."""
  plan = plan or Plan.for_head_dim(q.shape[3])
  if plan.h != q.shape[3]:
    raise ValueError(f"mgpu_attention: plan for H={plan.h}, inputs have H={q.shape[3]}")
  masked = has_segments or k.shape[1] % PAD != 0  # padded keys must be masked out
  return _attention(q, k, v, seg, causal, scale, masked, plan, interpret)
