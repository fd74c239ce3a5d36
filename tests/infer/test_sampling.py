"""sample(): greedy, temperature, top-k and top-p against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np

from mm_jax.infer.sampling import sample

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]], jnp.float32))


def draws(n: int, **kw) -> np.ndarray:
  """Token frequencies over n independent draws from LOGITS."""
  keys = jax.random.split(jax.random.key(0), n)
  ids = jax.vmap(lambda k: sample(LOGITS, k, **kw)[0])(keys)
  return np.bincount(np.asarray(ids), minlength=4) / n


def test_greedy_is_argmax_lowest_id_on_ties():
  logits = jnp.array([[0.0, 2.0, 2.0, 1.0], [3.0, 0.0, 0.0, 3.0]])
  np.testing.assert_array_equal(sample(logits, jax.random.key(0)), [1, 0])


def test_temperature_one_follows_the_softmax():
  # 20k draws: a frequency's standard error is below 0.004, so 0.015 is > 3.5 sigma.
  np.testing.assert_allclose(draws(20000, temperature=1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_top_k_keeps_the_k_largest_renormalised():
  np.testing.assert_allclose(draws(20000, temperature=1.0, top_k=2), [0.625, 0.375, 0, 0],
                             atol=0.015)
  np.testing.assert_array_equal(draws(200, temperature=1.0, top_k=1), [1, 0, 0, 0])


def test_top_p_keeps_the_smallest_set_reaching_p():
  # Mass before each token: 0, 0.5, 0.8, 0.95 -> p = 0.7 keeps the first two.
  np.testing.assert_allclose(draws(20000, temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0],
                             atol=0.015)
  np.testing.assert_array_equal(draws(200, temperature=1.0, top_p=0.01), [1, 0, 0, 0])


def test_low_temperature_approaches_greedy():
  np.testing.assert_array_equal(draws(200, temperature=1e-3), [1, 0, 0, 0])
