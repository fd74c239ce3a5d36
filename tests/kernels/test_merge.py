"""Merge kernel vs the where+gather reference, in the Pallas interpreter (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import export_for

from mm_jax.kernels import merge


def _index(b, t, spans):
  """media_index with media rows numbered in order over (row, start, length) spans."""
  idx, row = np.full((b, t), -1, np.int32), 0
  for r, start, n in spans:
    idx[r, start:start + n] = np.arange(row, row + n)
    row += n
  return jnp.asarray(idx), row


@pytest.mark.parametrize("spans", [
    [(0, 0, 6)],  # media at the start
    [(0, 5, 4), (1, 9, 6)],  # middle, two rows
    [(0, 10, 6), (1, 0, 3), (1, 13, 3)],  # end, and two items in one row
    [],  # no media at all
])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_merge_forward_and_gradients(spans, impl):
  b, t, d = 2, 16, 48  # 48 columns run as 3 steps of 16 (power-of-two chunks)
  index, m = _index(b, t, spans)
  text = jax.random.normal(jax.random.key(0), (b, t, d))
  media = jax.random.normal(jax.random.key(1), (m, d))
  g = jax.random.normal(jax.random.key(2), (b, t, d))
  f = lambda x, y: merge.merge_tokens(x, y, index, impl=impl, interpret=True)
  out, vjp = jax.vjp(f, text, media)
  d_text, d_media = vjp(g)
  is_media = np.asarray(index >= 0)
  rows = np.asarray(media)[np.maximum(index, 0)] if m else np.zeros_like(text)
  expected = np.where(is_media[..., None], rows, text)
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(d_text, np.where(is_media[..., None], 0.0, g))
  np.testing.assert_array_equal(d_media, np.asarray(g)[is_media][np.asarray(index)[is_media]
                                                                  .argsort()])


def test_destinations_invert_the_index():
  index, m = _index(2, 8, [(0, 2, 3), (1, 6, 2)])
  np.testing.assert_array_equal(merge.destinations(index, m + 1), [2, 3, 4, 14, 15, -1])


def test_bf16_text_with_float32_media():
  index, m = _index(1, 8, [(0, 1, 3)])
  text = jnp.ones((1, 8, 16), jnp.bfloat16)
  media = jnp.full((m, 16), 2.0, jnp.float32)
  out, vjp = jax.vjp(lambda x, y: merge.merge_tokens(x, y, index, impl="pallas",
                                                     interpret=True), text, media)
  assert out.dtype == jnp.bfloat16 and float(out[0, 2, 0]) == 2.0
  assert vjp(jnp.ones_like(out))[1].dtype == jnp.float32


@pytest.mark.parametrize("platform,d", [("cuda", 256), ("cuda", 5120), ("tpu", 256)])
def test_lowers_for_gpu_and_tpu(platform, d):
  text = jax.ShapeDtypeStruct((2, 64, d), jnp.bfloat16)
  media = jax.ShapeDtypeStruct((20, d), jnp.bfloat16)
  index = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  loss = lambda x, y, i: merge.merge_tokens(x, y, i, impl="pallas", interpret=False).astype(
      jnp.float32).sum()
  export_for(platform, jax.grad(loss, argnums=(0, 1)), text, media, index)
