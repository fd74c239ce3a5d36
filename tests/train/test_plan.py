"""The compiled per-device memory plan (mm_jax/train/plan.py) of `--dry_run`."""

import jax
from conftest import tiny_config

from mm_jax import run, sharding
from mm_jax.train import plan as plan_lib


def test_sharding_the_state_shrinks_each_devices_arguments():
  one = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 1})
  eight = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8})
  p1 = plan_lib.compiled_plan(one, sharding.make_mesh(one.mesh, jax.devices()[:1]))
  p8 = plan_lib.compiled_plan(eight, sharding.make_mesh(eight.mesh, jax.devices()[:8]))
  assert p1.devices == 1 and p8.devices == 8
  # The state (params + AdamW moments, float32) is most of the arguments: fsdp=8 splits
  # it, the batch too; small leaves (norm scales, biases) may stay replicated.
  assert p8.argument < p1.argument / 4, (p1, p8)
  assert 0 < p8.temp and p8.total == p8.argument + p8.output + p8.temp - p8.alias


def test_dry_run_prints_the_plan_beside_the_estimate_and_says_it_compiled_for_cpu(capsys):
  counts = run.dry_run(tiny_config(**{"mesh.data": -1}), memory_plan=True)
  out = capsys.readouterr().out
  assert "mm_jax: dry run for this host: 8 cpu device(s)" in out and "peak estimate" in out
  assert "train step: compiled for cpu in" in out
  assert "kernels: none compiled (CPU target: Pallas would run in the interpreter" in out
  assert "  per device: argument " in out and "FLOPs per step: " in out
  assert out.rstrip().splitlines()[-1].startswith("mm_jax: cpu: ")
  assert "decode step" not in out  # only with --target
  assert counts["plan_total_bytes"] > counts["plan_temp_bytes"] > 0 and counts["fits"]
