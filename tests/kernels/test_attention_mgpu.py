"""Hopper (Mosaic GPU) attention: interpreter numerics on CPU and CUDA lowering.

The Mosaic GPU interpreter runs the kernels' warpgroups, barriers and TMA copies on CPU
(the matmuls through `mgpu_common.Ops`' dot_general fallback). It costs ~50 s per 128-row
case on two cores, so one case runs by default and one more is marked slow.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import export_for

from mm_jax.kernels import attention as fa
from mm_jax.kernels import attention_mgpu as am
from mm_jax.kernels import compat
from mm_jax.kernels.mgpu_common import block_ranges

TOL = 2e-2  # relative to the reference's largest magnitude, bf16 inputs


def _inputs(b, t, n, k, h, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
  kv = [jax.random.normal(x, (b, t, k, h), jnp.bfloat16) for x in keys[1:3]]
  return q, *kv, jax.random.normal(keys[3], (b, t, n, h), jnp.bfloat16)


def _two_segments(b, t):
  row = np.zeros(t, np.int32)
  row[: t // 3], row[t // 3: t - 5] = 1, 2  # two samples, then 5 padding tokens
  return jnp.asarray(np.tile(row, (b, 1)))


def _check(b, t, n, k, h, causal, segmented, plan):
  q, kk, v, do = _inputs(b, t, n, k, h)
  seg = _two_segments(b, t) if segmented else jnp.zeros((b, t), jnp.int32)
  ours = lambda q, k, v: am.mgpu_attention(q, k, v, seg, causal=causal, scale=h**-0.5,
                                           has_segments=segmented, plan=plan, interpret=True)
  ref = lambda q, k, v: fa.attention_reference(
      *(x.astype(jnp.float32) for x in (q, k, v)),
      segment_ids=seg if segmented else None, causal=causal)
  out, vjp = jax.vjp(ours, q, kk, v)
  out_r, vjp_r = jax.vjp(ref, q, kk, v)
  for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *vjp(do)),
                        (out_r, *vjp_r(do.astype(jnp.float32))), strict=True):
    err = float(jnp.abs(a.astype(jnp.float32) - r).max())
    assert err <= TOL * float(jnp.abs(r).max()), (name, err)


def test_interpreted_kernels_match_reference():
  """Causal, two segments + padding, ragged T (100 -> 128), GQA 2, H 64; 64-row K/V blocks
  so the forward walks two pipeline steps and dK/dV refills its ring."""
  _check(1, 100, 2, 1, 64, causal=True, segmented=True, plan=am.Plan(64, fwd_kv=64))


@pytest.mark.slow
@pytest.mark.parametrize("b,t,n,k,h,causal,segmented,stages", [
    (1, 128, 1, 1, 128, False, False, 1),  # GQA 1, H 128; a 1-deep ring refills every step
    # GQA 4 over two ragged query tiles (T = S = 200) passes too but takes ~5 min in the
    # interpreter; tests/kernels/test_gpu.py covers it compiled (T 1000, GQA 4 and 8).
])
def test_interpreted_kernels_match_reference_more(b, t, n, k, h, causal, segmented, stages):
  _check(b, t, n, k, h, causal, segmented, am.Plan(h, fwd_kv=64, stages=stages))


def test_block_ranges_skip_causal_and_other_segments():
  seg = jnp.asarray([[1] * 128 + [2] * 128 + [3] * 256], jnp.int32)
  lo, hi = block_ranges(seg, seg, 128, 64, True, True)
  # Query tile 2 (segment 2) sees only key blocks 4, 5; tile 3 (segment 3) blocks 4..7.
  assert lo.tolist() == [[0, 2, 4, 4]] and hi.tolist() == [[2, 4, 6, 8]]
  lo, hi = block_ranges(seg, seg, 128, 64, True, False)  # key tiles over query blocks
  assert lo.tolist() == [[0, 2, 4, 6]] and hi.tolist() == [[2, 4, 8, 8]]


def _lower(q, k, seg, **kw):
  loss = lambda q, k, v, s: fa.flash_attention(q, k, v, segment_ids=s, interpret=False,
                                               **kw).astype(jnp.float32).sum()
  return export_for("cuda", jax.grad(loss, argnums=(0, 1, 2)), q, k, k, seg,
                    capability=(9, 0)).mlir_module()


@pytest.mark.parametrize("h,n,k,causal", [(64, 4, 4, True), (128, 8, 2, False),
                                          (256, 2, 1, True)])
def test_lowers_through_mosaic_gpu_on_hopper(h, n, k, causal):
  """Forward and backward lower to Mosaic GPU custom calls (not Triton) for sm90, unless the
  installed CUDA's ptxas miscompiles causal masking (then Triton, as jax refuses it too)."""
  q = jax.ShapeDtypeStruct((2, 320, n, h), jnp.bfloat16)
  kk = jax.ShapeDtypeStruct((2, 320, k, h), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 320), jnp.int32)
  text = _lower(q, kk, seg, causal=causal)
  mgpu, triton = text.count("custom_call @mosaic_gpu"), text.count("@__gpu$xla.gpu.triton")
  if compat.mgpu_causal_refused(causal):
    assert triton >= 3 and mgpu == 0
  else:
    assert mgpu >= 3 and triton == 0  # fwd, dq, dkv


@pytest.mark.parametrize("dtype,h", [(jnp.float32, 128), (jnp.bfloat16, 80)])
def test_unsupported_inputs_fall_back_to_triton(dtype, h):
  q = jax.ShapeDtypeStruct((1, 128, 2, h), dtype)
  seg = jax.ShapeDtypeStruct((1, 128), jnp.int32)
  text = _lower(q, q, seg)
  assert "triton" in text and "mosaic_gpu" not in text
