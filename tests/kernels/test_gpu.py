"""Compiled kernels on a GPU against the references, at training shapes (bf16).

Run with `JAX_PLATFORMS=cuda python -m pytest -m gpu tests/kernels` on a GPU machine
(tests/conftest.py defaults JAX_PLATFORMS to cpu; `bash bench/gpu.sh` runs this and every
GPU benchmark); elsewhere these are skipped with the reason (the interpreter tests cover the
same code paths on CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_jax import target
from mm_jax.kernels import attention as fa
from mm_jax.kernels import attention_mgpu, compat, merge

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("causal,packed,n,k", [(True, False, 16, 16), (False, False, 16, 16),
                                               (True, True, 16, 16), (True, False, 16, 2)])
def test_compiled_attention_matches_reference(causal, packed, n, k):
  b, t, h = 2, 1024, 128
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
  kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
  do = jax.random.normal(keys[3], (b, t, n, h), jnp.bfloat16)
  seg = (jnp.repeat(jnp.arange(1, 5), t // 4)[None].repeat(b, 0).astype(jnp.int32)
         if packed else None)
  ours = jax.jit(lambda q, k, v: jax.vjp(lambda *a: fa.flash_attention(
      *a, segment_ids=seg, causal=causal, interpret=False), q, k, v)[1](do))
  ref = jax.jit(lambda q, k, v: jax.vjp(lambda *a: fa.attention_reference(
      *(x.astype(jnp.float32) for x in a), segment_ids=seg, causal=causal), q, k, v)[1](
          do.astype(jnp.float32)))
  out = fa.flash_attention(q, kk, v, segment_ids=seg, causal=causal, interpret=False)
  out_r = fa.attention_reference(q.astype(jnp.float32), kk.astype(jnp.float32),
                                 v.astype(jnp.float32), segment_ids=seg, causal=causal)
  assert float(jnp.abs(out.astype(jnp.float32) - out_r).max()) <= 3e-2
  for a, r in zip(ours(q, kk, v), ref(q, kk, v), strict=True):
    assert float(jnp.abs(a.astype(jnp.float32) - r).max()) <= 1.2e-1


@pytest.mark.parametrize("t,h,n,k,causal,packed", [
    (2048, 128, 16, 16, True, False), (2048, 128, 16, 16, False, False),
    (2048, 64, 32, 32, True, True), (2048, 128, 16, 2, True, False),
    (1000, 128, 16, 4, False, True),  # ragged T and S, GQA 4, packed
    (1024, 256, 8, 8, True, False)])
def test_mosaic_gpu_attention_matches_reference(t, h, n, k, causal, packed):
  """sm90+: flash_attention dispatches to the Mosaic GPU kernels; fwd and grads vs reference."""
  cap = target.local().capability
  if cap is None or cap < (9, 0):
    pytest.skip(f"Mosaic GPU attention needs sm90+ (this GPU: {cap})")
  refused = compat.mgpu_causal_refused(causal)
  if refused:
    pytest.skip(f"flash_attention runs Triton here: {refused}")
  b = 2
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
  kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
  do = jax.random.normal(keys[3], (b, t, n, h), jnp.bfloat16)
  seg = None
  if packed:  # 4 samples, the last row ends in 37 padding tokens
    seg = jnp.repeat(jnp.arange(1, 5), -(-t // 4))[None, :t].repeat(b, 0).astype(jnp.int32)
    seg = seg.at[-1, -37:].set(0)
  assert attention_mgpu.unsupported(q, kk, v) is None
  fn = lambda q, k, v: fa.flash_attention(q, k, v, segment_ids=seg, causal=causal)
  hlo = jax.jit(lambda *a: jax.vjp(fn, *a)[1](do)).lower(q, kk, v).as_text()
  assert "mosaic_gpu" in hlo and "triton" not in hlo
  ref = lambda q, k, v: fa.attention_reference(q, k, v, segment_ids=seg, causal=causal)
  out, vjp = jax.vjp(jax.jit(fn), q, kk, v)
  f32 = [x.astype(jnp.float32) for x in (q, kk, v)]
  out_r, vjp_r = jax.vjp(jax.jit(ref), *f32)
  assert float(jnp.abs(out.astype(jnp.float32) - out_r).max()) <= 3e-2
  for a, r in zip(vjp(do), vjp_r(do.astype(jnp.float32)), strict=True):
    assert float(jnp.abs(a.astype(jnp.float32) - r).max()) <= 1.2e-1


def test_compiled_merge_matches_reference():
  b, t, d, per = 2, 1024, 4096, 576
  index = np.full((b, t), -1, np.int32)
  for r in range(b):
    index[r, 5:5 + per] = np.arange(r * per, (r + 1) * per)
  index = jnp.asarray(index)
  text = jax.random.normal(jax.random.key(0), (b, t, d), jnp.bfloat16)
  media = jax.random.normal(jax.random.key(1), (b * per, d), jnp.bfloat16)
  ours = jax.jit(lambda x, y: merge.merge_tokens(x, y, index, impl="pallas", interpret=False))
  np.testing.assert_array_equal(ours(text, media), merge.merge_tokens_reference(text, media,
                                                                                index))
