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
operand, nor `plgpu` layout casts; in interpret mode `mgpu_common.Ops` swaps exactly those for
`lax.dot_general` on the same SMEM tiles and plain jnp. The compiled path is checked by
lowering for CUDA on CPU and by the gpu-marked tests.

Files: this one (the API, padding and the custom VJP), `mgpu_forward.py`, `mgpu_backward.py`
and `mgpu_common.py` (what the kernels share).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mm_jax.kernels import compat
from mm_jax.kernels.mgpu_backward import backward
from mm_jax.kernels.mgpu_common import ROWS, block_ranges
from mm_jax.kernels.mgpu_forward import forward

Q_PAD, KV_PAD = -1, -2  # padding segment ids: they match nothing
PAD = 128  # T and S are padded to this multiple: every kernel's tile divides it
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
  lo, hi = block_ranges(qseg, kseg, 2 * ROWS, plan.fwd_kv, causal, True)
  out, lse = forward(qp, kp, vp, qseg, kseg, lo, hi, causal=causal, scale=scale,
                     masked=masked, plan=plan, interpret=interpret)
  out = out[:, : q.shape[1]]
  return out, (q, k, v, seg, out, lse)


def _attention_bwd(causal, scale, masked, plan, interpret, res, do):
  q, k, v, seg, out, lse = res
  qp, kp, vp, qseg, kseg = _prepare(q, k, v, seg)
  # delta_t = sum_h o_th do_th: the softmax-gradient row term both kernels share.
  delta = _pad(jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32),
                          do.astype(jnp.float32)), 2)
  dq, dk, dv = backward(qp, kp, vp, _pad(do, 1), lse, delta, qseg, kseg, causal=causal,
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
