"""Forward kernel of the Hopper attention (design: `attention_mgpu`): per (head, 128 query
rows, batch), two consumer warpgroups run the online softmax over the visible K/V blocks
that one producer warpgroup streams through the SMEM ring."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mm_jax.kernels import compat
from mm_jax.kernels.compat import pl
from mm_jax.kernels.mgpu_common import (
  LOG2E,
  MASK,
  ROWS,
  bcast,
  kv_producer,
  launch,
  run_roles,
  smem,
  visible,
)


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
      mask = visible(ops, s.shape, row_seg=q_seg, col_seg=k_seg, row0=row0, col0=j * bk,
                     causal=diagonal, rows_are_queries=True)
      if mask is not None:
        s = jnp.where(mask, s, MASK)
      m_new = jnp.maximum(m, s.max(axis=1))
      p = jnp.exp2(s - bcast(m_new, s.shape, 0))
      if mask is not None:
        p = jnp.where(mask, p, 0.0)  # rows with no visible key yet have m_new = MASK
      alpha = jnp.exp2(m - m_new)
      den = den * alpha + p.sum(axis=1)
      acc = acc * bcast(alpha, acc.shape, 0)
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
    q_s.at[wg][...] = (acc / bcast(den, acc.shape, 0)).astype(q_s.dtype)
    lse_s.at[wg][...] = m + jnp.log(den) * LOG2E  # base 2, like m
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_s.at[wg], o_ref.at[b, rows, n])
    plgpu.copy_smem_to_gmem(lse_s.at[wg], lse_ref.at[b, n, rows])
    plgpu.wait_smem_to_gmem(0)

  produce = kv_producer(k_ref, v_ref, kseg_ref, k_s, v_s, kseg_s, k_bar, v_bar, consumed,
                        b=b, kh=lambda: lax.div(n, group), lo=lo, hi=hi, block=bk, stages=st,
                        masked=masked)

  run_roles(2, compute, produce)


def forward(q, k, v, qseg, kseg, lo, hi, *, causal, scale, masked, plan, interpret):
  """Output [B, T_pad, N, H] and its log-sum-exp float32[B, N, T_pad] (base 2) on padded
  inputs; lo, hi: each query tile's visible K/V blocks (`block_ranges`)."""
  b, tp, n, h = q.shape
  f32, i32 = jnp.float32, jnp.int32
  st, bk = plan.stages, plan.fwd_kv
  barrier = compat.plgpu.Barrier
  scratch = [smem((2, ROWS, h), q.dtype), smem((st, bk, h), q.dtype),
             smem((st, bk, h), q.dtype), smem((2, ROWS), i32, False),
             smem((st, bk), i32, False), smem((2, ROWS), f32, False),
             barrier(num_barriers=4), barrier(num_barriers=2 * st), barrier(num_barriers=st),
             barrier(num_arrivals=2, num_barriers=st)]
  body = functools.partial(_fwd_kernel, plan=plan, group=n // k.shape[2], c=scale * LOG2E,
                           causal=causal, masked=masked, n_tiles=tp // (2 * ROWS))
  out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, tp), f32)]
  return launch(body, "attention_mgpu_fwd", (q, k, v, qseg, kseg, lo, hi), out_type, scratch,
                (n, tp // (2 * ROWS), b), 2, interpret)
