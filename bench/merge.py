r"""Multimodal merge: ours (Pallas, in place) vs XLA where+gather and XLA scatter, bf16.

  python bench/merge.py            # B 8, T 4096, D 4096, 576 media rows per sample (GPU)
  python bench/merge.py --smoke    # tiny shapes, runs anywhere (CPU: interpreter)

GB/s counts the bytes that must move: each media row read once and written once. The
device copy bandwidth (a plain copy of an array of the same bytes) is the yardstick.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import time_loop, versions  # noqa: E402
from mm_jax.kernels import merge  # noqa: E402


def inputs(b, t, d, per_sample):
  index = np.full((b, t), -1, np.int32)
  for r in range(b):  # one image's rows after a short prompt in every sample
    index[r, 5:5 + per_sample] = np.arange(r * per_sample, (r + 1) * per_sample)
  text = jax.random.normal(jax.random.key(0), (b, t, d), jnp.bfloat16)
  media = jax.random.normal(jax.random.key(1), (b * per_sample, d), jnp.bfloat16)
  return text, media, jnp.asarray(index)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args()
  b, t, d, per = (2, 64, 128, 16) if args.smoke else (8, 4096, 4096, 576)
  iters = 2 if args.smoke else 50
  text, media, index = inputs(b, t, d, per)
  dest = merge.destinations(index, media.shape[0])
  moved = 2 * media.size * media.dtype.itemsize  # read + write of every media row

  impls = {
      "ours (pallas)": lambda x: merge.merge_tokens(x, media, index, impl="pallas"),
      "xla where+gather": lambda x: merge.merge_tokens_reference(x, media, index),
      "xla scatter": lambda x: x.reshape(-1, d).at[dest].set(media, mode="drop").reshape(
          x.shape),
  }
  # Random, as the inputs: zeros can run faster than real data.
  copy_src = jax.random.normal(jax.random.key(2), (media.size,), jnp.bfloat16)
  copy = time_loop(lambda x: x + 1, copy_src, iters=iters)  # reads and writes `moved` bytes
  print(f"# merge, bf16, B {b} T {t} D {d}, {per} media rows/sample, {versions()}\n")
  print(f"device copy of {moved / 2e6:.1f} MB each way: {moved / copy / 1e9:.0f} GB/s\n")
  print("| impl | time (us) | GB/s (bytes that must move) | vs where+gather |")
  print("|---|---|---|---|")
  results = {name: time_loop(fn, text, iters=iters) for name, fn in impls.items()}
  for name, secs in results.items():
    speedup = results["xla where+gather"] / secs
    print(f"| {name} | {secs * 1e6:.1f} | {moved / secs / 1e9:.0f} | {speedup:.1f}x |")


if __name__ == "__main__":
  main()
