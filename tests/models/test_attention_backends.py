import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_jax.models import attention


@pytest.mark.parametrize("n,k", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_xla_attention_matches_reference_with_segments(n, k, causal):
  b, t, h = 2, 12, 16
  ks = jax.random.split(jax.random.key(n * 10 + k), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  kk = jax.random.normal(ks[1], (b, t, k, h))
  v = jax.random.normal(ks[2], (b, t, k, h))
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
  out = attention.attend(q, kk, v, segment_ids=seg, causal=causal, impl="xla")
  ref = attention.attend_reference(q, kk, v, segment_ids=seg, causal=causal)
  real = np.asarray(seg > 0)  # padding rows are never read
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)


def test_segments_do_not_attend_across():
  b, t, n, h = 1, 8, 2, 8
  q = jax.random.normal(jax.random.key(0), (b, t, n, h))
  v = jax.random.normal(jax.random.key(1), (b, t, n, h))
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2]])
  out = attention.attend(q, q, v, segment_ids=seg, causal=True, impl="xla")
  v2 = v.at[:, :4].set(100.0)  # changing segment 1 must not move segment 2
  out2 = attention.attend(q, q, v2, segment_ids=seg, causal=True, impl="xla")
  np.testing.assert_allclose(out[:, 4:], out2[:, 4:], rtol=1e-6)


def test_auto_resolves_per_platform():
  assert attention.resolve("auto", "cpu") == "xla"
  assert attention.resolve("auto", "gpu") == "pallas"
  assert attention.resolve("auto", "tpu") == "pallas"
  with pytest.raises(ValueError, match="cudnn needs a GPU"):
    attention.resolve("cudnn", "cpu")
