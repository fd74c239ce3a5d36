import jax
import jax.numpy as jnp
import numpy as np

from mm_jax.kernels.merge import merge_tokens


def test_merge_forward_and_gradients():
  b, t, d, m = 2, 6, 4, 3
  text = jax.random.normal(jax.random.key(0), (b, t, d))
  media = jax.random.normal(jax.random.key(1), (m, d))
  index = jnp.array([[-1, 0, 1, -1, -1, -1], [-1, -1, -1, -1, -1, 2]])
  out = merge_tokens(text, media, index, impl="xla")
  np.testing.assert_array_equal(out[0, 1], media[0])
  np.testing.assert_array_equal(out[1, 5], media[2])
  np.testing.assert_array_equal(out[0, 0], text[0, 0])
  g = jax.random.normal(jax.random.key(2), (b, t, d))
  gt, gm = jax.grad(lambda x, y: (merge_tokens(x, y, index) * g).sum(), argnums=(0, 1))(
      text, media)
  np.testing.assert_array_equal(gt, jnp.where((index >= 0)[..., None], 0.0, g))
  np.testing.assert_array_equal(gm, jnp.stack([g[0, 1], g[0, 2], g[1, 5]]))
