"""launch/local.py: the env a GPU JobSet pod gets, the exit-code contract, and restarts as the
JobSet's failure policy makes them (stand-in programs), then one real run: 2 main.py processes
x 2 CPU devices, process 0 killed mid-run, restarted, log the same loss at every step as 1
process x 4 devices.

The real run's flags are tests/train/test_preemption.py's tiny run, shortened.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import local

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
FLAGS = ["--config=configs/llava.py:tiny", f"--config.train.steps={STEPS}",
         "--config.train.log_every=1", "--config.checkpoint.every=2",
         "--config.checkpoint.keep=10", "--config.data.num_eval=32",
         "--config.eval.generate=False"]
TIMEOUT_S = 300


def _losses(workdir) -> dict[int, float]:
  """Step -> loss; the last record of a step wins (a restart logs the steps after its
  checkpoint again)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _launch(workdir, processes: int, devices: int, *ours: str):
  """launch.local in its own process group (so a timeout can end its children too)."""
  log = open(f"{workdir}.log", "w+")  # noqa: SIM115 (read back in _output)
  proc = subprocess.Popen(
    [sys.executable, "-m", "launch.local", f"--processes={processes}",
     f"--devices_per_process={devices}", *ours, "--", *FLAGS, f"--workdir={workdir}",
     "--heartbeat_timeout_s=20", "--distributed_timeout_s=120"],
    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  return proc, log


def _output(launched) -> str:
  with open(launched[1].name) as f:  # its own offset: the launcher may still be writing
    return f.read()


def _kill(launched) -> None:
  """The launcher and every process it started (its process group), if still there."""
  proc, _ = launched
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


def _finish(launched, deadline: float) -> tuple[int | None, str]:
  try:
    code = launched[0].wait(timeout=max(deadline - time.time(), 1))
  except subprocess.TimeoutExpired:
    code = None
  _kill(launched)
  return code, _output(launched)


def _wait_for(predicate, launched, deadline: float, what: str):
  """predicate()'s first true value; a failure naming `what` if the launcher ends first or
  the deadline passes (the caller kills what is left)."""
  while not (found := predicate()):
    if time.time() > deadline or launched[0].poll() is not None:
      pytest.fail(f"never saw {what}:\n{_output(launched)[-4000:]}")
    time.sleep(0.05)
  return found


@pytest.mark.slow  # ~95 s on 2 nearly idle cores (~70 s to the kill, the restart ~27 s)
def test_two_processes_restart_after_a_node_loss_and_match_one(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  # Both at once: the wall time is then about the slower run's, not the sum.
  ref, job = _launch(one, 1, 4), _launch(two, 2, 2, "--restarts=1")
  deadline = time.time() + TIMEOUT_S
  try:
    pid = int(_wait_for(
      lambda: re.search(r"^\[launch\.local\] process 0: pid (\d+) \(attempt 0\)$",
                        _output(job), re.MULTILINE), job, deadline, "process 0's pid")[1])
    # "2" is orbax's name for step 2 once its save committed (it writes into a tmp folder).
    _wait_for(lambda: os.path.isdir(two / "checkpoints" / "2"), job, deadline,
              "checkpoint 2 committed")
    os.kill(pid, signal.SIGKILL)  # process 0's node is lost: its training child dies with it
    (ref_code, ref_out), (code, out) = _finish(ref, deadline), _finish(job, deadline)
  finally:
    _kill(ref)
    _kill(job)
  assert ref_code == 0, ref_out[-4000:]
  assert code == 0, out[-4000:]
  restarts = [line for line in out.splitlines() if "restarting all" in line]
  assert len(restarts) == 1 and "attempt 0 ended with 43" in restarts[0], out[-4000:]
  before, after = out.split(restarts[0])
  # Process 1 saw the loss and exited 43 itself (main.py's supervisor), within the grace.
  assert "[1] peer lost" in before, before[-4000:]
  assert "(attempt 1)" in after
  resumed = re.search(r"^\[0\] resumed from step (\d+)", after, re.MULTILINE)
  assert resumed and 2 <= int(resumed[1]) < STEPS, after[-4000:]  # a checkpoint, not scratch
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
  assert local.exit_code([43, 0]) == 43  # lost: restartable, like 42
  assert local.exit_code([42, 43]) == 43  # the lost process saved nothing
  assert local.exit_code([43, 1]) == 1


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


def _attempts(tmp_path, first: str, then: str = "sys.exit(0)") -> tuple[str, ...]:
  """A stand-in that runs `first` on its process's first attempt and `then` after: a file
  per process in tmp_path counts its attempts."""
  return (sys.executable, "-c",
          "import os, signal, sys, time; i = os.environ['JAX_PROCESS_ID']; "
          f"f = os.path.join({str(tmp_path)!r}, i); n = len(open(f).read()) if "
          "os.path.exists(f) else 0; open(f, 'a').write('x'); print('attempt', n); "
          f"exec({first!r} if n == 0 else {then!r})")


def _restart_lines(out: str) -> list[str]:
  return [line for line in out.splitlines() if "restarting all" in line]


def test_a_lost_process_restarts_all_and_the_restart_finishes(tmp_path, capsys):
  # Process 1 exits 43; process 0 runs on and is killed after the grace period: the
  # launcher's own kill, so no failure. The restart finishes: 0.
  program = _attempts(tmp_path, "sys.exit(43) if i == '1' else time.sleep(60)")
  start = time.time()
  assert local.run(2, [], program=program, restarts=1, grace_s=1) == 0
  assert time.time() - start < 30
  out = capsys.readouterr().out
  assert _restart_lines(out) == [
    "[launch.local] attempt 0 ended with 43 (process 1 exited 43: peer lost or stalled): "
    "restarting all 2 processes (restart 1 of 1)"]
  assert re.search(r"^\[launch\.local\] process 1: pid \d+ \(attempt 1\)$", out, re.MULTILINE)
  assert "[0] attempt 1" in out and "[1] attempt 1" in out


def test_a_node_loss_restarts_all(tmp_path, capsys):
  # Process 0 dies of a SIGKILL the launcher did not send (its node is gone); process 1
  # sees it and exits 43, as main.py's supervisor does.
  program = _attempts(tmp_path, "os.kill(os.getpid(), signal.SIGKILL) if i == '0' else "
                      "(time.sleep(0.5), sys.exit(43))")
  assert local.run(2, [], program=program, restarts=1, grace_s=10) == 0
  (line,) = _restart_lines(capsys.readouterr().out)
  assert "process 0 killed by SIGKILL, not by the launcher" in line
  # Without restarts the job stops with 43 (restart me), not 137 (a crash).
  (tmp_path / "once").mkdir()
  program = _attempts(tmp_path / "once", "os.kill(os.getpid(), signal.SIGKILL)")
  assert local.run(2, [], program=program, grace_s=1) == 43


def test_a_failure_is_not_restarted(tmp_path, capsys):
  program = _attempts(tmp_path, "sys.exit(1)")
  assert local.run(2, [], program=program, restarts=2) == 1
  out = capsys.readouterr().out
  assert not _restart_lines(out) and "(attempt 1)" not in out


def test_restarts_used_up_give_the_last_attempts_code(tmp_path, capsys):
  program = _attempts(tmp_path, "sys.exit(43)", then="sys.exit(42)")
  assert local.run(2, [], program=program, restarts=2) == 42
  out = capsys.readouterr().out
  assert [line.split(" (")[0] for line in _restart_lines(out)] == [
    "[launch.local] attempt 0 ended with 43", "[launch.local] attempt 1 ended with 42"]
  assert re.search(r"attempt 2 ended with 42 \(process \d exited 42: preempted\): no restarts "
                   r"left \(--restarts=2\)", out), out


def test_a_stop_signal_to_the_launcher_is_passed_on_and_not_restarted(tmp_path, capsys):
  # Process 0 sends the launcher (this test's process) SIGTERM, as a user or a kubelet would;
  # every process gets SIGTERM, exits 42 as main.py does, and the job is not restarted.
  program = _attempts(tmp_path, "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42)); "
                      "time.sleep(1); i == '0' and os.kill(os.getppid(), signal.SIGTERM); "
                      "time.sleep(60)")
  start = time.time()
  assert local.run(2, [], program=program, restarts=1) == 42
  assert time.time() - start < 30
  assert not _restart_lines(capsys.readouterr().out)
