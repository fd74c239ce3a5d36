r"""Data pipeline throughput per CPU core: images, video decoding, log-mel features.

  python bench/data.py                      # COCO-like JPEGs, 10 s 640x480 H.264, 30 s audio
  python bench/data.py --smoke              # a few small images, a 1 s clip

Images: the per-sample worker path (read file, decode, expand to square, resize,
normalise) at 336 px; the 1b config's H100 step needs about 30 samples/s of 2048 tokens
(issue 4). Video: `video.load_video` of 8 uniformly sampled frames at 336 px (decoding runs
up to the last chosen frame, ~15/16 of the clip); frames/s counts the clip's frames.
Log-mel: `audio.log_mel` of a clip (80 bins). All on one core; multiply by the workers.
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
from mm_jax.data import audio, media, sources, video  # noqa: E402


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


def _median_rate(count: int, run, repeats: int = 3) -> float:
  """Median over `repeats` runs of count / seconds of run()."""
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    rates.append(count / (time.perf_counter() - t0))
  return statistics.median(rates)


def bench_images(n: int, shape: tuple[int, int], size: int) -> None:
  with tempfile.TemporaryDirectory() as root:
    path = make_folder(root, n, shape)
    source = sources.LlavaJsonSource(path, root)

    def run():
      for i in range(len(source)):
        sample = sources.parse_record(source[i], image_dir=root)
        for image in sample.images:
          media.preprocess(image, size=size, aspect="pad",
                           mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276))

    rate = _median_rate(len(source), run)
  print("| images | size | samples/s per core (median of 3) | cores for 30 samples/s |")
  print("|---|---|---|---|")
  print(f"| {shape[0]}x{shape[1]} JPEG | {size} | {rate:.1f} | {30 / rate:.1f} |")


def bench_video(seconds: int, fps: int, shape: tuple[int, int], size: int) -> None:
  """A clip of moving noise (so the codec has work to do), 8 frames out."""
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, (shape[1], shape[0] * 2, 3), np.uint8)
  frames = np.stack([base[:, i:i + shape[0]] for i in range(seconds * fps)])
  with tempfile.TemporaryDirectory() as root:
    path = os.path.join(root, "clip.mp4")
    video.write_video(path, frames, fps=fps, codec="libx264")
    clips = _median_rate(1, lambda: video.load_video(path, num_frames=8, size=size))
  print()
  print("| video | frames out | clips/s per core | frames/s per core (median of 3) |")
  print("|---|---|---|---|")
  print(f"| {seconds} s {shape[0]}x{shape[1]} H.264 {fps} fps | 8 x {size} px | {clips:.2f} "
        f"| {clips * len(frames):.0f} |")


def bench_log_mel(seconds: float) -> None:
  wave = np.random.default_rng(0).standard_normal(int(seconds * audio.SAMPLE_RATE))
  rate = _median_rate(5, lambda: [audio.log_mel(wave, n_mels=80) for _ in range(5)])
  print()
  print("| audio | log-mel | clips/s per core (median of 3) |")
  print("|---|---|---|")
  print(f"| {seconds:g} s at 16 kHz | {int(seconds * 100)} x 80 | {rate:.1f} |")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--size", type=int, default=336)
  args = parser.parse_args()
  if args.smoke:
    bench_images(8, (64, 48), args.size)
    bench_video(1, 10, (64, 48), 32)
    bench_log_mel(1.0)
  else:
    bench_images(200, (640, 480), args.size)
    bench_video(10, 30, (640, 480), args.size)
    bench_log_mel(30.0)


if __name__ == "__main__":
  main()
