"""mm_jax.models.layers.next_key: rngs.params()'s keys at a constant tracing cost."""

import time

import jax
from flax import nnx

from mm_jax.models.layers import next_key


def test_next_key_gives_the_same_keys_as_the_stream():
  a, b = nnx.Rngs(3), nnx.Rngs(3)
  for _ in range(4):
    assert (jax.random.key_data(a.params()) == jax.random.key_data(next_key(b))).all()
  assert int(a.params.count.get_value()) == int(b.params.count.get_value()) == 4


def _trace_seconds(n: int) -> float:
  """Seconds to trace n draws, each followed by some work, as model construction does."""
  def make():
    rngs, out = nnx.Rngs(0), 0.0
    for _ in range(n):
      out = out + jax.random.normal(next_key(rngs), (4,)).sum() * 2.0
    return out
  start = time.perf_counter()
  jax.make_jaxpr(make)()
  return time.perf_counter() - start


def test_tracing_cost_grows_linearly():
  # Through rngs.params() the cost per draw grows with the equations traced so far: 4x the
  # draws took about 16x the time. Here it is about 4x; allow 8x for a noisy machine.
  _trace_seconds(50)  # warm caches
  small, big = min(_trace_seconds(200) for _ in range(2)), min(_trace_seconds(800)
                                                               for _ in range(2))
  assert big < 8 * small, (small, big)
