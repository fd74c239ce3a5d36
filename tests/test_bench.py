"""The benchmark scripts stay runnable with one command (tiny shapes on CPU)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["attention", "merge", "data", "generate", "lora"])
def test_bench_smoke(script):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  r = subprocess.run([sys.executable, f"bench/{script}.py", "--smoke"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
  assert len(rows) >= 2 and "error" not in r.stdout, r.stdout
