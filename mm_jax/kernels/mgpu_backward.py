"""Backward kernels of the Hopper attention (design: `attention_mgpu`): dQ per query tile
over the visible K/V blocks, and dK/dV per key tile over the visible Q/dO blocks of every
query head in the KV head's group (so GQA needs no reduction afterwards)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mm_jax.kernels import compat
from mm_jax.kernels.compat import pl
from mm_jax.kernels.mgpu_common import (
  LOG2E,
  ROWS,
  bcast,
  block_ranges,
  kv_producer,
  launch,
  run_producer,
  run_roles,
  smem,
  visible,
)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, lo_ref,
               hi_ref, dq_ref, q_s, do_s, k_s, v_s, vec_s, qseg_s, kseg_s, q_bar, k_bar, v_bar,
               consumed, *, plan, group, c, scale, causal, masked, n_tiles, ops):
  """One (head, n_wg x 64 query rows, batch): dQ = scale * sum_j dS_j K_j over visible
  blocks."""
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
      p = jnp.exp2(s - bcast(lse, s.shape, 0))
      k_seg = None
      if masked:
        plgpu.barrier_wait(k_bar.at[slot + st])
        k_seg = ops.vector(kseg_s.at[slot], 0)
      mask = visible(ops, s.shape, row_seg=q_seg, col_seg=k_seg, row0=row0, col0=j * bk,
                     causal=diagonal, rows_are_queries=True)
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      plgpu.barrier_wait(v_bar.at[slot])
      dp = ops.mm(do_s.at[wg], v_s.at[slot], trans_b=True)
      ds = p * (dp - bcast(delta, dp.shape, 0))
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

  produce = kv_producer(k_ref, v_ref, kseg_ref, k_s, v_s, kseg_s, k_bar, v_bar, consumed,
                        b=b, kh=lambda: lax.div(n, group), lo=lo, hi=hi, block=bk, stages=st,
                        masked=masked)

  run_roles(n_wg, compute, produce)


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
      p = jnp.exp2(st_ - bcast(lse, st_.shape, 1))
      q_seg = ops.vector(qseg_s.at[slot], 0) if masked else None
      mask = visible(ops, p.shape, row_seg=k_seg, col_seg=q_seg, row0=row0, col0=i * bq,
                     causal=diagonal, rows_are_queries=False)
      if mask is not None:
        p = jnp.where(mask, p, 0.0)
      dv = ops.mm(p.astype(k_s.dtype), do_s.at[slot], acc=dv)
      dp = ops.mm(v_s.at[wg], do_s.at[slot], trans_b=True)
      ds = p * (dp - bcast(delta, dp.shape, 1))
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

    run_producer(group * n_q, st, consumed, issue)

  run_roles(n_wg, compute, produce)


def backward(q, k, v, do, lse, delta, qseg, kseg, *, causal, scale, masked, plan, interpret):
  """dQ, dK, dV on padded inputs (lse and delta float32[B, N, T_pad])."""
  b, tp, n, h = q.shape
  sp, kh = k.shape[1], k.shape[2]
  f32, i32 = jnp.float32, jnp.int32
  st, barrier = plan.stages, compat.plgpu.Barrier
  args = (q, k, v, do, lse, delta, qseg, kseg)
  common = dict(plan=plan, group=n // kh, c=scale * LOG2E, scale=scale, causal=causal,
                masked=masked)

  bk, n_wg = plan.dq_kv, plan.dq_wg
  scratch = [smem((n_wg, ROWS, h), q.dtype), smem((n_wg, ROWS, h), q.dtype),
             smem((st, bk, h), q.dtype), smem((st, bk, h), q.dtype),
             smem((n_wg, 2, ROWS), f32, False), smem((n_wg, ROWS), i32, False),
             smem((st, bk), i32, False), barrier(num_barriers=5 * n_wg),
             barrier(num_barriers=2 * st), barrier(num_barriers=st),
             barrier(num_arrivals=n_wg, num_barriers=st)]
  lo, hi = block_ranges(qseg, kseg, n_wg * ROWS, bk, causal, True)
  n_tiles = tp // (n_wg * ROWS)
  body = functools.partial(_dq_kernel, n_tiles=n_tiles, **common)
  dq = launch(body, "attention_mgpu_dq", (*args, lo, hi), jax.ShapeDtypeStruct(q.shape, q.dtype),
              scratch, (n, n_tiles, b), n_wg, interpret)

  bq, n_wg = plan.dkv_q, plan.dkv_wg
  scratch = [smem((n_wg, ROWS, h), k.dtype), smem((n_wg, ROWS, h), k.dtype),
             smem((n_wg, ROWS), i32, False), smem((st, bq, h), q.dtype),
             smem((st, bq, h), q.dtype), smem((st, 2, bq), f32, False),
             smem((st, bq), i32, False), barrier(num_barriers=3 * n_wg),
             barrier(num_barriers=5 * st), barrier(num_arrivals=n_wg, num_barriers=st)]
  lo, hi = block_ranges(kseg, qseg, n_wg * ROWS, bq, causal, False)
  body = functools.partial(_dkv_kernel, **common)
  kv_type = jax.ShapeDtypeStruct(k.shape, k.dtype)
  dk, dv = launch(body, "attention_mgpu_dkv", (*args, lo, hi), [kv_type, kv_type], scratch,
                  (kh, sp // (n_wg * ROWS), b), n_wg, interpret)
  return dq, dk, dv
