"""Device-side timing: many iterations inside one jit, warmed up, median over repeats.

The loop carries its output into the next iteration (a data dependence XLA cannot remove)
and the host clock brackets the whole loop, never a single call.
"""

from __future__ import annotations

import statistics
import time

import jax


def time_loop(step, init, *, iters: int = 20, repeats: int = 5) -> float:
  """Median seconds per `step(carry) -> carry` over `repeats` jitted loops of `iters`."""
  loop = jax.jit(lambda c: jax.lax.fori_loop(0, iters, lambda _, x: step(x), c))
  jax.block_until_ready(loop(init))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(init))
    times.append((time.perf_counter() - t0) / iters)
  return statistics.median(times)


def versions() -> str:
  import flax

  dev = jax.devices()[0]
  return f"jax {jax.__version__}, flax {flax.__version__}, {dev.platform} {dev.device_kind}"
