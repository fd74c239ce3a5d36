"""Fused (flash) attention in Pallas: forward and backward kernels, and a jnp reference.

`flash_attention(q float[B, T, N, H], k/v float[B, S, K, H], segment_ids int32[B, T])`
with N a multiple of K (grouped-query attention). Online softmax (Dao et al. 2022) keeps
memory linear in the sequence: the forward saves only the output and the log-sum-exp;
the backward recomputes probabilities block by block in two kernels (dK/dV over key
blocks, dQ over query blocks), so no [T, S] matrix is ever stored.

Masking is by segment: a query attends to a key only if both carry the same segment id
(packed samples; 0 = padding). Sequence tails that do not fill a block are padded with
segment ids that match nothing, so ragged lengths need no separate length mask. Key
blocks that are fully masked (above the causal diagonal, or whose segment range does not
meet the query block's) are skipped: the causal bound cuts the loop, a segment-range test
guards the block's matmuls.

Backends: one kernel body, lowered by Pallas' Triton backend on GPU, Mosaic on TPU, and
run by the interpreter on CPU (how CI tests it). On Hopper (sm90+) bf16/fp16 inputs with
H in {64, 128, 256} go to the Mosaic GPU kernels of `attention_mgpu` (wgmma + TMA
pipelining); float32 (wgmma multiplies 16-bit operands only), other head dims and jax
releases whose plgpu API lacks a name we use stay on Triton, with the reason logged once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from mm_jax import target
from mm_jax.kernels import attention_mgpu, compat
from mm_jax.kernels.compat import dot, interpret_for, pl, tpu_params, triton_params

MASK = -1e30  # finite, so fully masked rows never produce inf - inf = NaN
Q_PAD, KV_PAD = -1, -2  # segment ids of padding rows: they match nothing


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query / key block lengths of the forward and backward kernels (powers of two)."""

  q: int = 128
  kv: int = 128
  q_bwd: int = 64
  kv_bwd: int = 64

  def __post_init__(self):
    for name in ("q", "kv", "q_bwd", "kv_bwd"):
      size = getattr(self, name)
      if size < 1 or size & (size - 1):
        raise ValueError(f"BlockSizes.{name}={size}: must be a power of two")

  @classmethod
  def for_lengths(cls, t: int, s: int, base: BlockSizes, floor: int = 16) -> BlockSizes:
    """Shrinks blocks for short sequences, never below `floor` (16: the smallest GPU MMA
    tile; 128 on TPU)."""
    fit = lambda b, n: max(min(floor, b), min(b, 1 << max(n - 1, 1).bit_length()))
    return cls(fit(base.q, t), fit(base.kv, s), fit(base.q_bwd, t), fit(base.kv_bwd, s))

  @classmethod
  def default(cls, platform_name: str, row_bytes: int = 256) -> BlockSizes:
    """`row_bytes`: bytes of one (head-padded) row of q, k or v."""
    # Mosaic TPU tiles are (8, 128): every block that ends a layout is a multiple of 128.
    if platform_name == "tpu":
      return cls(128, 128, 128, 128)
    # The Triton forward holds a Q, K and V block in shared memory: 3 x 128 rows of 512 bytes
    # (float32, H 128) is 192 KiB, past an A100's 163 KiB. Wide rows take 64-row blocks.
    return cls(64, 64) if row_bytes > 256 else cls()

  @property
  def multiple(self) -> int:
    return max(self.q, self.kv, self.q_bwd, self.kv_bwd)


# ----------------------------------------------------------------------------- reference


def attention_reference(q, k, v, *, segment_ids=None, causal=True, scale=None):
  """Plain jnp attention in float32 with the same masking rules; float[B, T, N, H]."""
  n, kh, h = q.shape[2], k.shape[2], q.shape[3]
  scale = h**-0.5 if scale is None else scale
  k = jnp.repeat(k, n // kh, axis=2).astype(jnp.float32)
  v = jnp.repeat(v, n // kh, axis=2).astype(jnp.float32)
  s = jnp.einsum("BTNH,BSNH->BNTS", q.astype(jnp.float32), k) * scale
  mask = _mask(segment_ids, q.shape[:2], k.shape[1], causal)
  p = jnp.where(mask, jnp.exp(s - jnp.where(mask, s, MASK).max(-1, keepdims=True)), 0.0)
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  return jnp.einsum("BNTS,BSNH->BTNH", p, v).astype(q.dtype)


def _mask(segment_ids, bt, s, causal):
  b, t = bt
  mask = jnp.ones((b, 1, t, s), bool)
  if segment_ids is not None:
    mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  if causal:
    mask &= jnp.tril(jnp.ones((t, s), bool))[None, None]
  return mask


# ----------------------------------------------------------------------------- kernels


def _block_mask(q_seg, k_seg, q_start, k_start, causal):
  """bool[bq, bk]: same segment and (causal) key index <= query index."""
  mask = q_seg[:, None] == k_seg[None, :]
  if causal:
    qi = q_start + jax.lax.broadcasted_iota(jnp.int32, mask.shape, 0)
    ki = k_start + jax.lax.broadcasted_iota(jnp.int32, mask.shape, 1)
    mask &= qi >= ki
  return mask


def _overlap(a_seg, b_seg):
  """Whether two blocks may share a segment (their id ranges meet)."""
  return (a_seg.min() <= b_seg.max()) & (b_seg.min() <= a_seg.max())


def _kv_bound(i, bq, bk, n_kv, causal):
  """Key blocks [0, bound) a query block needs: the causal diagonal cuts the rest."""
  # lax.div, not //: floor division of signed ints lowers through `sign`, which Mosaic TPU
  # resolves per chip generation; these indices are never negative.
  return jnp.minimum(n_kv, jax.lax.div((i + 1) * bq + bk - 1, bk)) if causal else n_kv


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, causal,
                bk):
  """One (batch, head, query block): online softmax over key blocks."""
  i = pl.program_id(2)
  bq, h = q_ref.shape
  q = q_ref[...]
  q_seg = qseg_ref[0, :]

  def visit(j, carry):
    k_seg = kseg_ref[0, pl.ds(j * bk, bk)]

    def compute(carry):
      m, denom, acc = carry
      k = k_ref[pl.ds(j * bk, bk), :]
      v = v_ref[pl.ds(j * bk, bk), :]
      s = dot(q, k, trans_b=True).astype(jnp.float32) * scale
      mask = _block_mask(q_seg, k_seg, i * bq, j * bk, causal)
      s = jnp.where(mask, s, MASK)
      m_new = jnp.maximum(m, s.max(axis=1))
      p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
      alpha = jnp.exp(m - m_new)
      acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v).astype(jnp.float32)
      return m_new, denom * alpha + p.sum(axis=1), acc

    return jax.lax.cond(_overlap(q_seg, k_seg), compute, lambda c: c, carry)

  init = (jnp.full((bq,), MASK, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, h), jnp.float32))
  n_kv = k_ref.shape[0] // bk
  m, denom, acc = jax.lax.fori_loop(0, _kv_bound(i, bq, bk, n_kv, causal), visit, init)
  denom = jnp.where(denom == 0.0, 1.0, denom)  # rows with no visible key output 0
  o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
  lse_ref[0, :] = m + jnp.log(denom)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
                dk_ref, dv_ref, *, scale, causal, bq):
  """One (batch, kv head, key block): dK and dV summed over the group's query heads."""
  j = pl.program_id(2)
  g_heads, t_pad, _ = q_ref.shape
  bk, h = k_ref.shape
  k, v = k_ref[...], v_ref[...]
  k_seg = kseg_ref[0, :]
  first = jax.lax.div(j * bk, bq) if causal else 0  # blocks above the diagonal see nothing

  n_q = t_pad // bq - first

  def visit(idx, carry):
    g, i = jax.lax.div(idx, n_q), first + jax.lax.rem(idx, n_q)
    q_seg = qseg_ref[0, pl.ds(i * bq, bq)]

    def compute(carry):
      dk, dv = carry
      q = q_ref[g, pl.ds(i * bq, bq), :]
      do = do_ref[g, pl.ds(i * bq, bq), :]
      lse = lse_ref[g, 0, pl.ds(i * bq, bq)]
      delta = delta_ref[g, 0, pl.ds(i * bq, bq)]
      s = dot(q, k, trans_b=True).astype(jnp.float32) * scale
      mask = _block_mask(q_seg, k_seg, i * bq, j * bk, causal)
      p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
      dv = dv + dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
      dp = dot(do, v, trans_b=True).astype(jnp.float32)
      ds = p * (dp - delta[:, None]) * scale
      dk = dk + dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
      return dk, dv

    return jax.lax.cond(_overlap(q_seg, k_seg), compute, lambda c: c, carry)

  zeros = jnp.zeros((bk, h), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, g_heads * n_q, visit, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref,
               *, scale, causal, bk):
  """One (batch, head, query block): dQ over the key blocks it attends to."""
  i = pl.program_id(2)
  bq, h = q_ref.shape
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[0, :], delta_ref[0, :]
  q_seg = qseg_ref[0, :]

  def visit(j, dq):
    k_seg = kseg_ref[0, pl.ds(j * bk, bk)]

    def compute(dq):
      k = k_ref[pl.ds(j * bk, bk), :]
      v = v_ref[pl.ds(j * bk, bk), :]
      s = dot(q, k, trans_b=True).astype(jnp.float32) * scale
      mask = _block_mask(q_seg, k_seg, i * bq, j * bk, causal)
      p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
      dp = dot(do, v, trans_b=True).astype(jnp.float32)
      ds = p * (dp - delta[:, None]) * scale
      return dq + dot(ds.astype(k.dtype), k).astype(jnp.float32)

    return jax.lax.cond(_overlap(q_seg, k_seg), compute, lambda d: d, dq)

  n_kv = k_ref.shape[0] // bk
  dq = jax.lax.fori_loop(0, _kv_bound(i, bq, bk, n_kv, causal), visit,
                         jnp.zeros((bq, h), jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- calls


def _params(interpret: bool, n_grid: int):
  if interpret:
    return None
  if target.current().platform == "tpu":
    return tpu_params(*(("parallel",) * n_grid))
  return triton_params(num_warps=4, num_stages=2)


def _fwd_call(qt, kt, vt, qseg, kseg, *, scale, causal, bs, interpret):
  b, n, t_pad, h = qt.shape
  kh, s_pad = kt.shape[1], kt.shape[2]
  g = n // kh
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, bk=bs.kv)
  return pl.pallas_call(
      kernel,
      grid=(b, n, t_pad // bs.q),
      in_specs=[
          pl.BlockSpec((None, None, bs.q, h), lambda b, n, i: (b, n, i, 0)),
          pl.BlockSpec((None, None, s_pad, h), lambda b, n, i: (b, n // g, 0, 0)),
          pl.BlockSpec((None, None, s_pad, h), lambda b, n, i: (b, n // g, 0, 0)),
          pl.BlockSpec((None, 1, bs.q), lambda b, n, i: (b, 0, i)),
          pl.BlockSpec((None, 1, s_pad), lambda b, n, i: (b, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, bs.q, h), lambda b, n, i: (b, n, i, 0)),
          pl.BlockSpec((None, None, 1, bs.q), lambda b, n, i: (b, n, 0, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(qt.shape, qt.dtype),
                 jax.ShapeDtypeStruct((b, n, 1, t_pad), jnp.float32)],
      compiler_params=_params(interpret, 3),
      interpret=interpret,
      name="flash_attention_fwd",
  )(qt, kt, vt, qseg, kseg)


def _bwd_calls(qt, kt, vt, dot, lse, delta, qseg, kseg, *, scale, causal, bs, interpret):
  b, n, t_pad, h = qt.shape
  kh, s_pad = kt.shape[1], kt.shape[2]
  g = n // kh
  args = (qt, kt, vt, dot, lse, delta, qseg, kseg)
  dkv = functools.partial(_dkv_kernel, scale=scale, causal=causal, bq=bs.q_bwd)
  dk, dv = pl.pallas_call(
      dkv,
      grid=(b, kh, s_pad // bs.kv_bwd),
      in_specs=[
          pl.BlockSpec((None, g, t_pad, h), lambda b, k, j: (b, k, 0, 0)),
          pl.BlockSpec((None, None, bs.kv_bwd, h), lambda b, k, j: (b, k, j, 0)),
          pl.BlockSpec((None, None, bs.kv_bwd, h), lambda b, k, j: (b, k, j, 0)),
          pl.BlockSpec((None, g, t_pad, h), lambda b, k, j: (b, k, 0, 0)),
          pl.BlockSpec((None, g, 1, t_pad), lambda b, k, j: (b, k, 0, 0)),
          pl.BlockSpec((None, g, 1, t_pad), lambda b, k, j: (b, k, 0, 0)),
          pl.BlockSpec((None, 1, t_pad), lambda b, k, j: (b, 0, 0)),
          pl.BlockSpec((None, 1, bs.kv_bwd), lambda b, k, j: (b, 0, j)),
      ],
      out_specs=[pl.BlockSpec((None, None, bs.kv_bwd, h), lambda b, k, j: (b, k, j, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct(kt.shape, kt.dtype)] * 2,
      compiler_params=_params(interpret, 3),
      interpret=interpret,
      name="flash_attention_dkv",
  )(*args)
  dq_kernel = functools.partial(_dq_kernel, scale=scale, causal=causal, bk=bs.kv_bwd)
  dq = pl.pallas_call(
      dq_kernel,
      grid=(b, n, t_pad // bs.q_bwd),
      in_specs=[
          pl.BlockSpec((None, None, bs.q_bwd, h), lambda b, n, i: (b, n, i, 0)),
          pl.BlockSpec((None, None, s_pad, h), lambda b, n, i: (b, n // g, 0, 0)),
          pl.BlockSpec((None, None, s_pad, h), lambda b, n, i: (b, n // g, 0, 0)),
          pl.BlockSpec((None, None, bs.q_bwd, h), lambda b, n, i: (b, n, i, 0)),
          pl.BlockSpec((None, None, 1, bs.q_bwd), lambda b, n, i: (b, n, 0, i)),
          pl.BlockSpec((None, None, 1, bs.q_bwd), lambda b, n, i: (b, n, 0, i)),
          pl.BlockSpec((None, 1, bs.q_bwd), lambda b, n, i: (b, 0, i)),
          pl.BlockSpec((None, 1, s_pad), lambda b, n, i: (b, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, bs.q_bwd, h), lambda b, n, i: (b, n, i, 0)),
      out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
      compiler_params=_params(interpret, 3),
      interpret=interpret,
      name="flash_attention_dq",
  )(*args)
  return dq, dk, dv


# ----------------------------------------------------------------------------- API


def _pad_to(x, axis, multiple, value=0):
  pad = (-x.shape[axis]) % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _head_pad(h: int) -> int:
  """Head dims are zero-padded to a power of two (Triton loads power-of-two shapes; zero
  columns change no dot product): 80 (Phi-2) -> 128."""
  return 1 << (h - 1).bit_length()


def _prepare(q, k, v, seg, bs):
  """BTNH -> BNTH padded to whole blocks; segment ids [B, 1, T] padded to match nothing."""
  m, hp = bs.multiple, _head_pad(q.shape[-1])
  qt = _pad_to(_pad_to(q.transpose(0, 2, 1, 3), 2, m), 3, hp)
  kt = _pad_to(_pad_to(k.transpose(0, 2, 1, 3), 2, m), 3, hp)
  vt = _pad_to(_pad_to(v.transpose(0, 2, 1, 3), 2, m), 3, hp)
  qseg = _pad_to(seg[:, None, : q.shape[1]], 2, m, Q_PAD)
  kseg = _pad_to(seg[:, None, : k.shape[1]], 2, m, KV_PAD)
  return qt, kt, vt, qseg, kseg


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seg, causal, scale, bs, interpret):
  return _flash_fwd(q, k, v, seg, causal, scale, bs, interpret)[0]


def _flash_fwd(q, k, v, seg, causal, scale, bs, interpret):
  qt, kt, vt, qseg, kseg = _prepare(q, k, v, seg, bs)
  ot, lse = _fwd_call(qt, kt, vt, qseg, kseg, scale=scale, causal=causal, bs=bs,
                      interpret=interpret)
  out = ot[:, :, : q.shape[1], : q.shape[3]].transpose(0, 2, 1, 3)
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(causal, scale, bs, interpret, res, do):
  q, k, v, seg, out, lse = res
  qt, kt, vt, qseg, kseg = _prepare(q, k, v, seg, bs)
  m = bs.multiple
  dot = _pad_to(_pad_to(do.transpose(0, 2, 1, 3), 2, m), 3, _head_pad(q.shape[3]))
  # delta_t = sum_h o_th * do_th: a [B, N, T] row reduction the kernels share.
  delta = _pad_to(jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32),
                             do.astype(jnp.float32)), 2, m)[:, :, None, :]
  dq, dk, dv = _bwd_calls(qt, kt, vt, dot, lse, delta, qseg, kseg, scale=scale,
                          causal=causal, bs=bs, interpret=interpret)
  t, s = q.shape[1], k.shape[1]
  unpad = lambda x, n: x[:, :, :n, : q.shape[3]].transpose(0, 2, 1, 3)
  return unpad(dq, t), unpad(dk, s), unpad(dv, s), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    segment_ids: jax.Array | None = None, causal: bool = True,
                    scale: float | None = None, interpret: bool | None = None,
                    block_sizes: BlockSizes | None = None) -> jax.Array:
  """Fused attention, float[B, T, N, H]; differentiable in q, k and v.

  segment_ids int32[B, T] (self-attention, T == S): 0 marks padding, which attends only
  to padding. `interpret=None`: interpreter on CPU, compiled kernels on GPU/TPU.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  if n % kh:
    raise ValueError(f"flash_attention: {n} query heads not a multiple of {kh} kv heads")
  if segment_ids is not None and s != t:
    raise ValueError("flash_attention: segment_ids need self-attention (T == S)")
  seg = (jnp.zeros((b, max(t, s)), jnp.int32) if segment_ids is None
         else segment_ids.astype(jnp.int32))
  tgt, interpret = target.current(), interpret_for(interpret)
  on_tpu = tgt.platform == "tpu" and not interpret
  row_bytes = _head_pad(h) * q.dtype.itemsize
  bs = BlockSizes.for_lengths(t, s, block_sizes or BlockSizes.default(tgt.platform, row_bytes),
                              floor=128 if on_tpu else 16)
  scale = float(h**-0.5 if scale is None else scale)
  if not math.isfinite(scale):
    raise ValueError(f"flash_attention: bad scale {scale}")
  if tgt.platform == "gpu" and not interpret and mosaic_gpu_refusal(q, k, v, causal, tgt) is None:
    return attention_mgpu.mgpu_attention(q, k, v, seg, causal=causal, scale=scale,
                                         has_segments=segment_ids is not None)
  return _flash(q, k, v, seg, causal, scale, bs, interpret)


def mosaic_gpu_refusal(q, k, v, causal: bool, tgt: target.Target) -> str | None:
  """Why the Hopper kernels do not run these inputs on `tgt` (logged once; None: they do):
  the compute capability, dtypes, head dim, jax's plgpu API, or a ptxas known to
  miscompile causal masking."""
  cap = tgt.capability
  reason = (f"compute capability {cap} < 9.0" if cap is None or cap < (9, 0)
            else attention_mgpu.unsupported(q, k, v) or compat.mgpu_causal_refused(causal))
  if reason:
    _log_fallback(reason)
  return reason


@functools.cache
def _log_fallback(reason: str):
  logging.getLogger(__name__).info("flash_attention: Triton kernels (%s)", reason)
