"""launch/local.py: 2 real main.py processes x 2 CPU devices, started with a GPU JobSet pod's
env (launch.gke.env_for), log the same loss at every step as 1 process x 4 devices.

The flags are tests/train/test_preemption.py's tiny run, shortened (no checkpoints between).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import local

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 4
FLAGS = ["--config=configs/llava.py:tiny", f"--config.train.steps={STEPS}",
         "--config.train.log_every=1", "--config.data.num_eval=32",
         "--config.eval.generate=False"]
TIMEOUT_S = 240


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _launch(workdir, processes: int, devices: int):
  """launch.local in its own process group (so a timeout can end its children too)."""
  log = open(f"{workdir}.log", "w+")  # noqa: SIM115 (read back in _finish)
  proc = subprocess.Popen(
    [sys.executable, "-m", "launch.local", f"--processes={processes}",
     f"--devices_per_process={devices}", "--", *FLAGS, f"--workdir={workdir}",
     "--heartbeat_timeout_s=20", "--distributed_timeout_s=120"],
    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  return proc, log


def _finish(launched, deadline: float) -> tuple[int, str]:
  proc, log = launched
  try:
    code = proc.wait(timeout=max(deadline - time.time(), 1))
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  log.seek(0)
  return code, log.read()


@pytest.mark.slow  # ~60 s on 2 idle cores; ~3 min while another test run shares them
def test_two_processes_match_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  # Both at once: the wall time is then about the slower run's, not the sum.
  ref, run = _launch(one, 1, 4), _launch(two, 2, 2)
  deadline = time.time() + TIMEOUT_S
  (ref_code, ref_out), (code, out) = _finish(ref, deadline), _finish(run, deadline)
  assert ref_code == 0, ref_out[-4000:]
  assert code == 0, out[-4000:]
  assert "[0] " in out and "[1] " in out  # each process's output, prefixed
  want, got = _losses(one), _losses(two)
  assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)


def test_process_envs_are_a_gpu_pods_with_a_local_coordinator():
  envs = local.process_envs(2, 2, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert [e["JAX_PROCESS_ID"] for e in envs] == ["0", "1"]
  for e in envs:
    assert e["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1" and e["JAX_NUM_PROCESSES"] == "2"
    assert e["JAX_COORDINATOR_PORT"] == envs[0]["JAX_COORDINATOR_PORT"]
    assert (e["JAX_PLATFORMS"], e["JAX_NUM_CPU_DEVICES"]) == ("cpu", "2")
    assert "XLA_FLAGS" not in e


def test_exit_code_follows_the_contract():
  assert local.exit_code([0, 0]) == 0
  assert local.exit_code([42, 0]) == 42
  assert local.exit_code([42, 1, 3]) == 1  # the first failure, preemptions aside
  assert local.exit_code([3, -9]) == 3  # the others were killed after it
  assert local.exit_code([-6]) == 134  # killed by a signal: 128 + N, as a shell reports it


def test_a_failing_process_ends_the_others_and_sets_the_exit_code(capsys):
  # Process 1 fails with 3 (diverged); process 0 would run for a minute unless killed.
  stand_in = ("import os, sys, time; i = os.environ['JAX_PROCESS_ID']; print('up', i); "
              "sys.exit(3) if i == '1' else time.sleep(60)")
  start = time.time()
  assert local.run(2, [], program=(sys.executable, "-c", stand_in)) == 3
  assert time.time() - start < 30
  assert "[1] up 1" in capsys.readouterr().out


def test_preempted_processes_give_42():
  stand_in = "import sys; sys.exit(42)"
  assert local.run(2, [], program=(sys.executable, "-c", stand_in)) == 42
