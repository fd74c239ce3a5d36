r"""Compile time of the train step against decoder depth, unrolled beside scanned layers
(issue 21, item 1: `model.scan_layers`).

  python bench/compile.py                                 # 7b,stage=finetune, depths 2, 32
  python bench/compile.py --preset=13b --depths=2,40
  python bench/compile.py --smoke                         # tiny, depths 1, 2 (CI)

What is timed is `mm_jax/train/plan.py`'s `lower_train_step` (the step `loop.train` jits,
lowered from abstract shapes: nothing is allocated, so a 7b step compiles on a laptop) and
then `.compile()` of it, on ONE device, micro-batch `--batch` x the preset's seq_len.
Each (layout, depth) is a fresh build, so no jit cache is shared between them. Rounds
alternate the order of the four builds (reversed every other round) so that a slow
stretch of the machine hits each alike; medians over `--rounds`. The ratio is the deep
build's total over the shallow one's: 1.0 is compile time flat in depth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import versions  # noqa: E402
from configs import llava  # noqa: E402
from mm_jax import config as config_lib  # noqa: E402
from mm_jax import sharding  # noqa: E402
from mm_jax.train import plan  # noqa: E402
from mm_jax.train import state as state_lib  # noqa: E402


def make_config(preset: str, depth: int, scan: bool, batch: int) -> config_lib.Config:
  cd = llava.get_config(preset)
  with cd.unlocked():
    cd.model.decoder.depth = depth
    cd.model.scan_layers = scan
    cd.train.batch_size = batch
    cd.mesh.data, cd.mesh.fsdp, cd.mesh.tensor = 1, 1, 1
  return config_lib.from_config_dict(cd)


def time_compile(cfg: config_lib.Config) -> tuple[float, float]:
  """(lower seconds, compile seconds) of a fresh build of `cfg`'s train step."""
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  built = state_lib.build(cfg, mesh)
  t0 = time.perf_counter()
  lowered = plan.lower_train_step(cfg, mesh, built)
  t1 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--preset", default="7b,stage=finetune")
  parser.add_argument("--depths", default="2,32", help="shallow,deep decoder depths")
  parser.add_argument("--batch", type=int, default=1, help="rows per step")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  preset = "tiny,stage=finetune" if args.smoke else args.preset
  depths = (1, 2) if args.smoke else tuple(int(d) for d in args.depths.split(","))
  rounds = 1 if args.smoke else args.rounds
  if len(depths) != 2 or not 0 < depths[0] < depths[1]:
    raise SystemExit(f"--depths: two depths, shallow then deep, got {args.depths!r}")

  runs = [(scan, depth) for scan in (False, True) for depth in depths]
  times: dict[tuple[bool, int], list[tuple[float, float]]] = {r: [] for r in runs}
  for i in range(rounds):
    for scan, depth in (runs if i % 2 == 0 else runs[::-1]):
      cfg = make_config(preset, depth, scan, args.batch)
      times[scan, depth].append(time_compile(cfg))
      lower, comp = times[scan, depth][-1]
      print(f"round {i}: scan_layers={scan} depth {depth}: lower {lower:.1f} s, "
            f"compile {comp:.1f} s", flush=True)

  cfg = make_config(preset, depths[0], False, args.batch)
  print(f"\n# Train step compile time, {preset}, micro-batch {args.batch} x "
        f"{cfg.data.seq_len}, remat={cfg.model.remat}, one device, {versions()}\n")
  print(f"Medians of {rounds} alternating round(s), seconds.\n")
  print("| layers | depth | lower (s) | compile (s) | total (s) | deep / shallow |")
  print("|---|---|---|---|---|---|")
  for scan in (False, True):
    total = {d: statistics.median(lo + co for lo, co in times[scan, d]) for d in depths}
    for d in depths:
      lower = statistics.median(lo for lo, _ in times[scan, d])
      comp = statistics.median(co for _, co in times[scan, d])
      ratio = f"{total[d] / total[depths[0]]:.2f}" if d == depths[1] else ""
      print(f"| {'scanned' if scan else 'unrolled'} | {d} | {lower:.1f} | {comp:.1f} | "
            f"{total[d]:.1f} | {ratio} |")


if __name__ == "__main__":
  main()
