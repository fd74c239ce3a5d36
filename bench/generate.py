r"""Decode speed with the KV cache: tokens/s per batch size, prefill latency, bf16.

  python bench/generate.py                 # 7b shape (random weights), one GPU
  python bench/generate.py --preset=1b
  python bench/generate.py --smoke         # tiny shape, runs anywhere

Each prompt is one image (the tower's placeholders) plus 64 text tokens. A run is one
jitted call (prefill, then a `while_loop` of decode steps with no stop token, so every
row decodes all `n` tokens); decode tokens/s = B * (n2 - n1) / (t(n2) - t(n1)) from
medians of 5 timed calls at n1 and n2 new tokens, which cancels prefill and dispatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import versions  # noqa: E402
from configs import llava  # noqa: E402
from mm_jax import config as config_lib  # noqa: E402
from mm_jax.infer.generate import Decoding, Generator, left_pad  # noqa: E402
from mm_jax.models.multimodal import MultimodalModel, resolve_backends  # noqa: E402


def random_model(preset: str) -> tuple[MultimodalModel, config_lib.ModelConfig]:
  """Random bf16 weights made on the device (no host copy of a 7B model)."""
  cfg = config_lib.from_config_dict(llava.get_config(preset)).model
  cfg = resolve_backends(dataclasses.replace(cfg, param_dtype=cfg.dtype, remat="none"))
  make = lambda: MultimodalModel(cfg, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  state = jax.jit(lambda: nnx.split(make())[1])()
  return nnx.merge(graphdef, state), cfg


def timed(gen: Generator, batch: dict, repeats: int = 5) -> float:
  """Median seconds of one whole generate call (compiled and warmed up first)."""
  run = lambda: jax.block_until_ready(gen._fn(gen.state, batch, jax.random.key(0)))
  run()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="7b")
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args()
  preset = "tiny" if args.smoke else args.preset
  model, cfg = random_model(preset)
  sizes = (1, 4) if args.smoke else (1, 8, 32, 64)
  n1, n2 = (2, 34) if args.smoke else (16, 144)
  per = cfg.vision.tokens_per_image
  rng = np.random.default_rng(0)
  print(f"# decode, {preset} ({cfg.dtype}), prompt = 1 image ({per} tokens) + 64 text, "
        f"{versions()}\n")
  print("| batch | prefill+1 token (ms) | decode tokens/s | ms per decode step |")
  print("|---|---|---|---|")
  for b in sizes:
    prompt = [cfg.image_token_id] * per + list(rng.integers(3, 1000, 64) % 100)
    batch = {**left_pad([np.asarray(prompt, np.int32)] * b, pad_id=0),
             "images": np.zeros((b, cfg.vision.image_size, cfg.vision.image_size, 3),
                                np.float32).astype(cfg.dtype),
             "image_valid": np.ones(b, bool)}
    t = {n: timed(Generator(model, Decoding(max_new_tokens=n)), batch) for n in (1, n1, n2)}
    step = (t[n2] - t[n1]) / (n2 - n1)
    print(f"| {b} | {t[1] * 1e3:.1f} | {b / step:.0f} | {step * 1e3:.2f} |")


if __name__ == "__main__":
  main()
