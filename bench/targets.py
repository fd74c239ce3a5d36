"""Will each big preset fit? Every preset and stage compiled for TPU and GPU machines.

  .venv-targets/bin/python bench/targets.py [--presets=7b,13b,phi2] [--targets=...] [--smoke]

Runs `main.py --dry_run --target=...` (the deviceless compile, mm_jax/aot.py) once per
(preset, stage, target) in its own process and prints a markdown table: compiled, the
per-chip plan of the train step (the larger of train and decode), the batch per chip, and
whether it fits the chip. Needs jax[tpu] and jax[cuda12] at the project's jax version
(.ci/run's .venv-targets). Results append to --out as JSON lines, so a run can be resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretrain", "finetune", "finetune_lora", "finetune_qlora")
# name -> (main.py target flags, config overrides). The presets' global batch is 128: 16 per
# GPU on 8 GPUs, 2 per chip on v5p-128. 2 x v6e-256 is 512 chips: one row each, with data
# parallelism across the slices.
TARGETS = {
    "v5p-128": (["--target=v5p-128"], []),
    "v6e-256x2": (["--target=v6e-256", "--target_slices=2"],
                  ["--config.train.batch_size=512", "--config.mesh.data=2"]),
    "8xH100": (["--target=a3-highgpu-8g"], []),
    "8xH200": (["--target=a3-ultragpu-8g"], []),
}
SMOKE = {"v5p-8": (["--target=v5p-8"], []), "8xH100": (["--target=a3-highgpu-8g"], [])}


def run_one(preset: str, stage: str, target: str, timeout: int) -> dict:
  flags, overrides = {**TARGETS, **SMOKE}[target]
  cmd = [sys.executable, os.path.join(ROOT, "main.py"),
         f"--config=configs/llava.py:{preset},stage={stage}", *flags, *overrides]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out, code = proc.stdout + proc.stderr, proc.returncode
  except subprocess.TimeoutExpired:
    out, code = "", None
  row = {"preset": preset, "stage": stage, "target": target, "exit": code,
         "wall_s": round(time.perf_counter() - t0, 1)}
  if m := re.search(r"micro-batch (\d+) x (\d+) per data-parallel device", out):
    row["batch_per_chip"] = int(m[1])
  totals = [float(x) for x in re.findall(r"total ([\d.]+) GiB", out)]
  if totals:
    row["train_gib"] = totals[0]
  if m := re.search(r"mm_jax: \S+: ([\d.]+) GiB per chip of ([\d.]+) GiB: (fits|does not fit)",
                    out):
    row.update(gib=float(m[1]), hbm_gib=float(m[2]), fits=m[3] == "fits")
  if m := re.search(r"train step: compiled for .* in ([\d.]+) s", out):
    row["compile_s"] = float(m[1])
  row["kernels"] = sorted(set(re.findall(r"kernel (\S+): \d+ ([\w ]+) custom", out)))
  if code not in (0, 1) or "gib" not in row:
    row["error"] = (out.strip().splitlines() or ["timeout"])[-1][:300]
  return row


def table(rows: list[dict]) -> str:
  lines = ["| preset | stage | target | compiled | GiB per chip (train) | of | batch per chip "
           "| fits |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ok = "yes" if "gib" in r else f"no: {r.get('error', '?')}"
    lines.append(f"| {r['preset']} | {r['stage']} | {r['target']} | {ok} | "
                 f"{r.get('train_gib', '-')} | {r.get('hbm_gib', '-')} | "
                 f"{r.get('batch_per_chip', '-')} | "
                 f"{'yes' if r.get('fits') else 'no' if 'fits' in r else '-'} |")
  return "\n".join(lines)


def matrix(rows: list[dict], targets: list[str]) -> str:
  """One row per preset and stage, one column per target: the train step's per-chip GiB (the
  decode step's where larger), the batch per chip, and whether the larger fits (`-`: not
  compiled)."""
  cell = {(r["preset"], r["stage"], r["target"]): r for r in rows}
  keys = dict.fromkeys((r["preset"], r["stage"]) for r in rows)
  lines = ["| preset, stage | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
  for preset, stage in keys:
    out = []
    for t in targets:
      r = cell.get((preset, stage, t))
      if r is None:
        out.append("-")
      elif "gib" not in r:
        out.append(f"failed: {r.get('error', '?')}")
      else:
        verdict = "fits" if r["fits"] else "does not fit"
        train = r.get("train_gib", r["gib"])
        decode = f" (decode {r['gib']:.2f})" if r["gib"] > train else ""
        out.append(f"{train:.2f} GiB{decode}, {r['batch_per_chip']}/chip: {verdict}")
    lines.append(f"| {preset}, {stage} | " + " | ".join(out) + " |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--presets", default="7b,13b,phi2")
  p.add_argument("--stages", default=",".join(STAGES))
  p.add_argument("--targets", default=",".join(TARGETS))
  p.add_argument("--out", default="/tmp/mm_jax_targets.jsonl")
  p.add_argument("--timeout", type=int, default=1800)
  p.add_argument("--smoke", action="store_true", help="the tiny preset on v5p-8 and 8 x H100")
  a = p.parse_args()
  if a.smoke:
    a.presets, a.stages, a.targets = "tiny", "full", ",".join(SMOKE)
  done = []
  if os.path.exists(a.out):
    with open(a.out) as f:
      done = [json.loads(line) for line in f if line.strip()]
  have = {(r["preset"], r["stage"], r["target"]) for r in done}
  for target in a.targets.split(","):
    for preset in a.presets.split(","):
      for stage in a.stages.split(","):
        if (preset, stage, target) in have:
          continue
        row = run_one(preset, stage, target, a.timeout)
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
          f.write(json.dumps(row) + "\n")
        done.append(row)
  print(table(done))
  print(matrix(done, [t for t in {**TARGETS, **SMOKE} if any(r["target"] == t for r in done)]))


if __name__ == "__main__":
  main()
