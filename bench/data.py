r"""Data pipeline throughput per CPU core: images, video decoding, log-mel features.

  python bench/data.py                      # COCO-like JPEGs, 10 s 640x480 H.264, 30 s audio
  python bench/data.py --smoke              # a few small images, a 2 s clip

Images: the per-sample worker path (read file, decode, expand to square, resize,
normalise) at 336 px; the 1b config's H100 step needs about 30 samples/s of 2048 tokens
(issue 4). Video: `video.load_video` of 8 uniformly sampled frames at 336 px, with a keyframe
every second and with one per clip, beside `load_video_before` (the loader before issue 21:
one decode of every frame from the start up to the last chosen one), alternating, both
single-threaded; frames/s counts the clip's frames. Log-mel: `audio.log_mel` of a clip
(80 bins). All on one core (pin it: taskset -c 1); multiply by the workers.
"""

from __future__ import annotations

import argparse
import functools
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


def load_video_before(path: str, *, num_frames: int, size: int) -> np.ndarray:
  """uint8[F, S, S, 3] as `video.load_video` (uniform, resize) made them before issue 21.

  A demux pass for the packet times, then a second open decoding every frame from the start
  until the one after the last chosen frame, converting the chosen ones: kept here verbatim
  (less the errors) so the speed-up stays measurable after the loader changes.
  """
  import av

  with av.open(path) as container:
    stream = container.streams.video[0]
    times = sorted(float(p.pts * stream.time_base) for p in container.demux(stream)
                   if p.pts is not None and p.size)
  targets = [times[(2 * k + 1) * len(times) // (2 * num_frames)] for k in range(num_frames)]
  out, shown, rgb = [], None, None
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    for frame in container.decode(stream):
      t = frame.time if frame.time is not None else (0.0 if shown is None else shown.time)
      while len(out) < len(targets) and targets[len(out)] < t - 1e-6:
        if rgb is None:
          rgb = (frame if shown is None else shown).to_ndarray(format="rgb24")
        out.append(rgb)
      if len(out) == len(targets):
        break
      shown, rgb = frame, None
    if len(out) < len(targets):
      rgb = shown.to_ndarray(format="rgb24") if rgb is None else rgb
      out += [rgb] * (len(targets) - len(out))
  return np.stack([media.fit(f, size=size, aspect="resize", mean=(0.5, 0.5, 0.5))
                   for f in out])


def bench_video(seconds: int, fps: int, shape: tuple[int, int], size: int,
                repeats: int = 3) -> None:
  """A clip of moving noise (so the codec has work to do), 8 frames out, per keyframe spacing.

  Before and after alternate within each repeat, so a busy neighbour slows both alike.
  """
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, (shape[1], shape[0] * 2, 3), np.uint8)
  frames = np.stack([base[:, i:i + shape[0]] for i in range(seconds * fps)])
  print()
  print("| video | keyframes | frames out | before clips/s | after clips/s | after / before "
        "| after frames/s per core |")
  print("|---|---|---|---|---|---|---|")
  for gop in sorted({fps, len(frames)}):
    with tempfile.TemporaryDirectory() as root:
      path = os.path.join(root, "clip.mp4")
      video.write_video(path, frames, fps=fps, codec="libx264", gop=gop)
      runs = {"before": functools.partial(load_video_before, path, num_frames=8, size=size),
              "after": functools.partial(video.load_video, path, num_frames=8, size=size)}
      assert np.array_equal(runs["after"]()[0], runs["before"]()), "the loaders disagree"
      rates = {"before": [], "after": []}
      for _ in range(repeats):
        for name, run in runs.items():
          t0 = time.perf_counter()
          run()
          rates[name].append(1 / (time.perf_counter() - t0))
    old, new = statistics.median(rates["before"]), statistics.median(rates["after"])
    spacing = "one per clip" if gop == len(frames) else f"every {gop / fps:g} s"
    print(f"| {seconds} s {shape[0]}x{shape[1]} H.264 {fps} fps | {spacing} | 8 x {size} px "
          f"| {old:.2f} | {new:.2f} | {new / old:.2f}x | {new * len(frames):.0f} |")


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
    bench_video(2, 10, (64, 48), 32)  # 2 s: a keyframe a second differs from one per clip
    bench_log_mel(1.0)
  else:
    bench_images(200, (640, 480), args.size)
    bench_video(10, 30, (640, 480), args.size)
    bench_log_mel(30.0)


if __name__ == "__main__":
  main()
