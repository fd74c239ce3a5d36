"""Flash attention kernels vs the jnp reference, in the Pallas interpreter (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import export_for

from mm_jax.kernels import attention as fa

SMALL = fa.BlockSizes(16, 16, 16, 16)  # several blocks per row even for short rows
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # max abs error over unit-variance inputs


def _segments(b, t, kind):
  if kind is None:
    return None
  rows = []
  for r in range(b):
    if kind == "packed" and r == 1:
      rows.append([0] * t)  # a row that is all padding
    else:
      cuts = sorted({t // 5, t // 2 + r, (4 * t) // 5})
      row = np.zeros(t, np.int32)
      for n, c in enumerate(cuts):
        row[c:] = n + 1 if kind == "packed" else 1
      row[: cuts[0]] = 1
      row[-3:] = 0  # trailing padding
      rows.append(row)
  return jnp.asarray(np.array(rows), jnp.int32)


CASES = [  # b, t, s, n, k, h, causal, segments, dtype
    (2, 48, 48, 2, 2, 64, True, None, jnp.float32),
    (1, 37, 37, 4, 1, 128, False, None, jnp.float32),
    (2, 33, 33, 8, 1, 256, True, None, jnp.float32),
    (3, 64, 64, 4, 2, 64, True, "packed", jnp.float32),
    (2, 40, 40, 4, 4, 64, False, "packed", jnp.float32),
    (1, 40, 24, 2, 2, 64, False, None, jnp.float32),  # cross attention, S != T
    (1, 24, 24, 2, 2, 80, True, None, jnp.float32),  # Phi-2 head dim, padded to 128
    (2, 64, 64, 8, 2, 128, True, "packed", jnp.bfloat16),
]


@pytest.mark.parametrize("b,t,s,n,k,h,causal,kind,dtype", CASES)
def test_forward_and_gradients_match_reference(b, t, s, n, k, h, causal, kind, dtype):
  keys = jax.random.split(jax.random.key(b * 1000 + t * 10 + n), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), dtype)
  kk = jax.random.normal(keys[1], (b, s, k, h), dtype)
  v = jax.random.normal(keys[2], (b, s, k, h), dtype)
  do = jax.random.normal(keys[3], (b, t, n, h), dtype)
  seg = _segments(b, t, kind)
  ours = lambda q, k, v: fa.flash_attention(q, k, v, segment_ids=seg, causal=causal,
                                            block_sizes=SMALL, interpret=True)
  ref = lambda q, k, v: fa.attention_reference(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      segment_ids=seg, causal=causal)
  out, vjp = jax.vjp(ours, q, kk, v)
  out_r, vjp_r = jax.vjp(ref, q, kk, v)
  grads, grads_r = vjp(do), vjp_r(do.astype(jnp.float32))
  tol = TOL[dtype]
  scale = 1.0 if dtype == jnp.float32 else 4.0  # bf16 gradients sum many rounded terms
  with jax.default_matmul_precision("highest"):
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_r, *grads_r),
                          strict=True):
      err = float(jnp.abs(a.astype(jnp.float32) - r).max())
      assert err <= tol * (scale if name != "out" else 1.0), (name, err)


def test_skipped_blocks_do_not_change_results():
  """Blocks above the diagonal / across segments are skipped; masking alone agrees."""
  b, t, n, h = 1, 64, 2, 64
  q, kk, v = (jax.random.normal(jax.random.key(i), (b, t, n, h)) for i in range(3))
  seg = jnp.asarray([[1] * 16 + [2] * 16 + [3] * 32], jnp.int32)
  big = fa.flash_attention(q, kk, v, segment_ids=seg, block_sizes=fa.BlockSizes(64, 64, 64,
                                                                                  64),
                           interpret=True)
  small = fa.flash_attention(q, kk, v, segment_ids=seg, block_sizes=SMALL, interpret=True)
  np.testing.assert_allclose(small, big, atol=2e-6)


def test_block_sizes_shrink_for_short_rows():
  bs = fa.BlockSizes.for_lengths(40, 40, fa.BlockSizes())
  assert (bs.q, bs.kv, bs.q_bwd, bs.kv_bwd) == (64, 64, 64, 64)
  assert fa.BlockSizes.for_lengths(40, 40, fa.BlockSizes.default("tpu"), floor=128).q == 128


def test_bad_arguments():
  with pytest.raises(ValueError, match="power of two"):
    fa.BlockSizes(q=96)
  q = jnp.zeros((1, 8, 3, 16))
  with pytest.raises(ValueError, match="not a multiple"):
    fa.flash_attention(q, jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_gpu_and_tpu(platform):
  """Forward + backward lower through Triton (GPU) and Mosaic (TPU) at bf16, H 128."""
  q = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 256, 2, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  loss = lambda q, k, v, s: fa.flash_attention(q, k, v, segment_ids=s, interpret=False).astype(
      jnp.float32).sum()
  exported = export_for(platform, jax.grad(loss, argnums=(0, 1, 2)), q, k, k, seg)
  text = exported.mlir_module()
  assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
