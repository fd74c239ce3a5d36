"""The tiny run's train and decode steps compiled for a TPU slice and a GPU machine, as
`main.py --dry_run --target` does: kernels compiled (custom calls present), plan, verdict."""

import os
import subprocess
import sys

import jax
import pytest
from deviceless import need

from configs import llava
from mm_jax import accelerators, run
from mm_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name,attention,merge,backend", [
    ("v5p-8", "pallas", "pallas", "Mosaic TPU"),
    ("a3-highgpu-8g", "pallas", "pallas", "Triton"),  # float32: Triton attention on sm_90
])
def test_tiny_steps_compile_with_our_kernels(name, attention, merge, backend, capsys):
  machine = accelerators.machine(name)
  need(machine.chip.platform)
  cd = llava.get_config("tiny")
  with cd.unlocked():
    cd.model.attention, cd.model.merge = attention, merge
  out = run.dry_run(config_lib.from_config_dict(cd), machine=machine)
  text = capsys.readouterr().out
  kernels = {k for k, b in out["kernels"] if b == backend}
  assert {"flash_attention_fwd", "flash_attention_dkv", "flash_attention_dq",
          "merge_put_rows", "merge_take_rows"} <= kernels, out["kernels"]
  assert out["fits"] and f"decode step: compiled for {machine.chip.name}" in text
  assert text.rstrip().splitlines()[-1].startswith(f"mm_jax: {name}: ")


def test_auto_compiles_cudnn_attention_for_a_bf16_model_on_h100(capsys):
  """The GPU baseline `auto` picks: cuDNN's fused attention, forward and backward, through
  XLA's GPU compiler (its workspace is not sized without a device)."""
  need("gpu")
  cd = llava.get_config("tiny")
  with cd.unlocked():
    cd.model.dtype = "bfloat16"
  # The root conftest asks for `highest` matmul precision; XLA's GPU compiler finds no Triton
  # GEMM tiling for bf16 dots at that precision, and a bf16 run would not ask for it.
  with jax.default_matmul_precision("default"):
    out = run.dry_run(config_lib.from_config_dict(cd), machine=accelerators.machine("h100x8"))
  assert "backends for h100 (sm_90): attention=cudnn, merge=xla" in capsys.readouterr().out
  cudnn = {k for k, b in out["kernels"] if b == "cuDNN"}
  assert any("Backward" in k for k in cudnn) and any("Backward" not in k for k in cudnn), cudnn


def test_main_target_ends_with_the_fits_line():
  need("tpu")
  r = subprocess.run([sys.executable, "main.py", "--config=configs/llava.py:tiny",
                      "--target=v5e-4"], cwd=ROOT, capture_output=True, text=True,
                     timeout=600, env={**os.environ, "XLA_FLAGS": ""})
  assert r.returncode == 0, r.stderr[-2000:]
  assert "backends for v5e: attention=pallas, merge=xla" in r.stdout
  assert "kernel flash_attention_fwd:" in r.stdout and "Mosaic TPU custom call" in r.stdout
  last = r.stdout.rstrip().splitlines()[-1]
  assert last.startswith("mm_jax: v5e-4: ") and last.endswith("GiB per chip of 16.0 GiB: fits")


def test_multislice_meshes_put_data_across_slices():
  """2 x v6e-16: `data` spans the slices (data-centre network), fsdp stays inside one
  slice's ICI; a data axis the slices do not divide is a config error naming the key."""
  from deviceless import devices

  from mm_jax import sharding
  from mm_jax.config import ConfigError, MeshConfig

  devs = devices("v6e-16", slices=2)
  mesh = sharding.make_mesh(MeshConfig(2, -1, 1), devs)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 16, "tensor": 1}
  for row, slice_index in zip(mesh.devices[:, :, 0], (0, 1), strict=True):
    assert {d.slice_index for d in row} == {slice_index}
  with pytest.raises(ConfigError, match="config.mesh.data: 1 is not a multiple of the 2 slices"):
    sharding.make_mesh(MeshConfig(1, -1, 1), devs)


def test_targets_bench_smoke(tmp_path):
  """bench/targets.py --smoke: the tiny preset compiled for v5p-8 and 8 x H100, a table row
  each that says it compiled and fits."""
  need("tpu")
  need("gpu")
  r = subprocess.run([sys.executable, "bench/targets.py", "--smoke",
                      f"--out={tmp_path / 'rows.jsonl'}"], cwd=ROOT, capture_output=True,
                     text=True, timeout=900, env={**os.environ, "XLA_FLAGS": ""})
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [line for line in r.stdout.splitlines() if line.startswith("| tiny | ")]
  assert len(rows) == 2 and all("| yes |" in row and row.endswith("| yes |") for row in rows)
