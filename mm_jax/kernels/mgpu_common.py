"""Shared parts of the Hopper attention kernels (`attention_mgpu`, whose docstring has the
design): constants, the ops the Mosaic GPU interpreter lacks, masks, SMEM buffers, the
producer and consumer warpgroup roles, the visible block ranges and the launch."""

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
LOG2E = math.log2(math.e)
ROWS = 64  # rows per consumer warpgroup: the wgmma M tile


@dataclasses.dataclass(frozen=True)
class Ops:
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


def bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


def visible(ops, shape, *, row_seg, col_seg, row0, col0, causal, rows_are_queries):
  """bool[shape] of visible (row, column) pairs, or None when every pair is visible."""
  mask = None
  if row_seg is not None:
    mask = bcast(row_seg, shape, 0) == bcast(col_seg, shape, 1)
  if causal:
    rows = ops.iota(shape, 0) + row0
    cols = ops.iota(shape, 1) + col0
    vis = rows >= cols if rows_are_queries else rows <= cols
    mask = vis if mask is None else mask & vis
  return mask


def smem(shape, dtype, swizzled=True):
  plgpu = compat.plgpu
  if not swizzled:
    return plgpu.SMEM(shape, dtype)
  # 128-byte swizzle over (8, 64) tiles: the layout wgmma reads without bank conflicts.
  tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  return plgpu.SMEM(shape, dtype, transforms=tr)


def run_producer(n_steps, stages, consumed, issue):
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


def kv_producer(k_ref, v_ref, kseg_ref, k_s, v_s, kseg_s, k_bar, v_bar, consumed, *, b, kh,
                lo, hi, block, stages, masked):
  """The producer of the query-tile kernels (forward, dQ): streams K/V blocks [lo, hi) of
  KV head `kh()` (evaluated in the producer warpgroup) and, when masked, their segment ids
  (barriers k_bar[stages + slot]) through the ring. Returns the `produce` of `run_roles`."""
  plgpu = compat.plgpu

  def produce():
    head = kh()

    def issue(s, slot):
      cols = pl.ds((lo + s) * block, block)
      plgpu.copy_gmem_to_smem(k_ref.at[b, cols, head], k_s.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, cols, head], v_s.at[slot], v_bar.at[slot])
      if masked:
        plgpu.copy_gmem_to_smem(kseg_ref.at[b, cols], kseg_s.at[slot],
                                k_bar.at[slot + stages])

    run_producer(hi - lo, stages, consumed, issue)

  return produce


def run_roles(n_wg, compute, produce):
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


def block_ranges(row_seg, col_seg, row_tile, col_blk, causal, rows_are_queries):
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


def launch(body, name, args, out_type, scratch, grid, n_wg, interpret):
  body = functools.partial(body, ops=Ops(interpret))
  body.__name__ = name  # the kernel's name in profiles
  return compat.plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid,
      grid_names=("n", "i", "b"), num_threads=n_wg + 1, thread_name="wg",
      compiler_params=compat.mgpu_params(),
      interpret=compat.mgpu_interpret_params() if interpret else None)(*args)
