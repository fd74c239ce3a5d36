"""The benchmark scripts stay runnable with one command (tiny shapes on CPU)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
GPU_STEPS = ("attention", "merge", "generate", "lora", "step")  # bench/gpu.sh runs these


def table_rows(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.startswith("| ")]


def test_data_bench_smoke():
  r = subprocess.run([sys.executable, "bench/data.py", "--smoke"], cwd=ROOT, env=ENV,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert len(table_rows(r.stdout)) >= 2 and "error" not in r.stdout, r.stdout


def test_compile_bench_smoke():
  """bench/compile.py --smoke: both layouts at two depths, one table row each."""
  r = subprocess.run([sys.executable, "bench/compile.py", "--smoke"], cwd=ROOT, env=ENV,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = table_rows(r.stdout)[1:]  # after the header
  assert [row.split("|")[1].strip() for row in rows] == ["unrolled"] * 2 + ["scanned"] * 2


def test_gpu_script_smoke(tmp_path):
  """bench/gpu.sh --smoke: every GPU benchmark on tiny shapes, one log each in $OUT, and a
  summary with every step's exit code (python3 is this interpreter, as on the device)."""
  bin_dir = os.path.dirname(sys.executable)
  env = {**ENV, "OUT": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "PYTHONPATH": ROOT}
  r = subprocess.run(["bash", "bench/gpu.sh", "--smoke"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  summary = table_rows((tmp_path / "summary.md").read_text())[1:]
  assert [row.split("|")[1].strip() for row in summary] == ["test_gpu", *GPU_STEPS]
  for row in summary:
    name, code = (cell.strip() for cell in row.split("|")[1:3])
    assert code == "0", (tmp_path / f"{name}.log").read_text()[-3000:]
  for name in GPU_STEPS:  # the log holds stderr too: only the tables must be free of errors
    log = (tmp_path / f"{name}.log").read_text()
    rows = table_rows(log)
    assert len(rows) >= 2 and not any("error" in row for row in rows), log[-3000:]
