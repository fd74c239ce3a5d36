r"""Image pipeline throughput: samples/s per CPU core at 336 px (LLaVA-1.5 preprocessing).

  python bench/data.py                      # JPEGs like COCO (640x480), 336 px, pad
  python bench/data.py --smoke              # a few small images

Measures the per-sample worker path (read file, decode, expand to square, resize,
normalise, template, tokens) on one core; multiply by the worker count of a GPU host.
The 1b config's H100 step needs about 30 samples/s of 2048 tokens (issue 4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mm_jax.data import media, sources  # noqa: E402


def make_folder(root: str, n: int, size: tuple[int, int]) -> str:
  rng = np.random.default_rng(0)
  records = []
  for i in range(n):
    pixels = rng.integers(0, 255, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, f"{i}.jpg"), quality=90)
    records.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "A photo of random noise."}]})
  path = os.path.join(root, "data.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--size", type=int, default=336)
  args = parser.parse_args()
  n, shape = (8, (64, 48)) if args.smoke else (200, (640, 480))
  with tempfile.TemporaryDirectory() as root:
    path = make_folder(root, n, shape)
    source = sources.LlavaJsonSource(path, root)
    rates = []
    for _ in range(3):
      t0 = time.perf_counter()
      for i in range(len(source)):
        sample = sources.parse_record(source[i], image_dir=root)
        for image in sample.images:
          media.preprocess(image, size=args.size, aspect="pad",
                           mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276))
      rates.append(len(source) / (time.perf_counter() - t0))
  rate = statistics.median(rates)
  print("| images | size | samples/s per core (median of 3) | cores for 30 samples/s |")
  print("|---|---|---|---|")
  print(f"| {shape[0]}x{shape[1]} JPEG | {args.size} | {rate:.1f} | {30 / rate:.1f} |")


if __name__ == "__main__":
  main()
