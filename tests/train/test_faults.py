"""Faults an operator meets, staged for real on main.py (tiny preset, 12 steps, a checkpoint
every 3): a disk that fills between saves, a second run on the same workdir, a stop signal
before training has a state, a save that fails on a restart, a stuck writer, a peer that
dies. Each checks the exit code, the one line, what is on disk, and that the same command
afterwards ends with the losses of an uninterrupted run (test_preemption's reference)."""

import os
import resource
import signal
import time

import pytest
from test_preemption import (
    STEPS,
    Job,
    _assert_same_losses,
    _checkpoints,
    _wait_for,
    reference,  # noqa: F401 - the module fixture
)


def _logged(workdir, steps: int):
  metrics = os.path.join(workdir, "metrics.jsonl")
  return lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= steps


def _last_line(job, i: int = 0) -> str:
  return job.output(i).strip().splitlines()[-1]


def test_a_disk_that_fills_between_saves_stops_in_one_line(tmp_path, reference):  # noqa: F811
  """After checkpoint 3 and step 4, no file of the run may grow past 1 KiB (RLIMIT_FSIZE:
  EFBIG, as ENOSPC on a full disk): the next metrics line fails. Before, TensorBoard's
  writer thread died and the training thread blocked forever on its queue."""
  workdir = str(tmp_path / "run")
  job = Job(workdir)
  _wait_for(lambda: "3" in _checkpoints(workdir) and _logged(workdir, 4)(), job,
            "checkpoint 3 and step 4")
  resource.prlimit(job.child(), resource.RLIMIT_FSIZE, (1024, 1024))
  assert job.wait() == [1], job.all_output()
  last = _last_line(job)
  assert last.startswith(f"error: cannot write {workdir}/"), last
  assert "File too large; newest intact checkpoint: step " in last, last
  assert "Traceback" not in job.output()
  assert "3" in _checkpoints(workdir)
  restart = Job(workdir)
  assert restart.wait() == [0], restart.all_output()
  _assert_same_losses(workdir, reference)


def test_a_second_run_on_the_same_workdir_stops_naming_the_first(tmp_path,
                                                                 reference):  # noqa: F811
  workdir = str(tmp_path / "run")
  first = Job(workdir)
  _wait_for(_logged(workdir, 2), first, "step 2 of the first run")
  second = Job(workdir)
  assert second.wait() == [1], second.all_output()
  last = _last_line(second)
  assert last.startswith(f"config error: --workdir={workdir} is in use by another run (host "), last
  assert f"pid {first.child()}" in last, last
  assert first.wait() == [0], first.all_output()
  _assert_same_losses(workdir, reference)  # each step once, in order: nothing torn


def _catches_sigterm(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/status") as f:
      caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
  except (FileNotFoundError, StopIteration):
    return False
  return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize("when", ["interpreter start", "imports"])
def test_a_stop_signal_before_training_has_a_state_exits_42(tmp_path, when):
  """As soon as the parent's handler is in (main.py's first lines: the child has not started
  or runs none of main.py yet), or the child's (its first lines; jax is imported after):
  exit 42 in one line, no checkpoint. Only the interpreter's own start-up, before main.py's
  first line, is left to the default action (killed by SIGTERM, 143)."""
  workdir = str(tmp_path / "run")
  job = Job(workdir)
  pid = job.procs[0].pid if when == "interpreter start" else job.child()
  _wait_for(lambda: _catches_sigterm(pid), job, "the early handler", timeout=60)
  job.procs[0].send_signal(signal.SIGTERM)
  assert job.wait() == [42], job.all_output()
  assert "before training started: nothing to save, nothing lost; exit 42" in _last_line(job)
  assert _checkpoints(workdir) == []


def test_a_save_that_fails_on_a_restart_is_one_line(tmp_path, reference):  # noqa: F811
  """A restart from checkpoint 6 whose first save (step 9) fails: one line, no page of
  orbax's 'Event loop is closed' tracebacks."""
  import shutil

  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir, ignore=shutil.ignore_patterns("log_*", "logs"))
  for step in _checkpoints(workdir):
    if int(step) > 6:
      shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  job = Job(workdir, wrap="import resource; resource.setrlimit(resource.RLIMIT_FSIZE, "
                          "(1 << 18, 1 << 18))")
  assert job.wait() == [1], job.all_output()
  assert _last_line(job).startswith("checkpoint error: checkpoint step 9 failed to save ("), \
      job.all_output()
  assert "Traceback" not in job.output() and "Event loop is closed" not in job.output()
  restart = Job(workdir)
  assert restart.wait() == [0], restart.all_output()
  _assert_same_losses(workdir, reference)


def test_a_stuck_writer_is_ended_by_the_watchdog(tmp_path, reference):  # noqa: F811
  """metrics.jsonl is a FIFO nobody reads (a hung network file system looks the same): the
  run makes no progress, and the watchdog ends it after train.stall_timeout_s with the
  stacks in a report."""
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  os.mkfifo(os.path.join(workdir, "metrics.jsonl"))
  start = time.monotonic()
  job = Job(workdir, flags=("--config.train.stall_timeout_s=10",))
  assert job.wait() == [43], job.all_output()
  assert time.monotonic() - start < 10 + 120  # start-up on a loaded machine, then 10 s
  last = _last_line(job)
  assert last.startswith("stalled: no progress for 10 s (config.train.stall_timeout_s)"), last
  report = last.split("stacks in ")[1].split(";")[0]
  assert report.startswith(os.path.join(workdir, "logs")), report
  assert "paths.py" in open(report).read()  # where it was stuck: LineLog opening the FIFO
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  restart = Job(workdir)
  assert restart.wait() == [0], restart.all_output()
  _assert_same_losses(workdir, reference)


# victim 0 (the coordinator's process), with a restart through launch.local:
# tests/launch/test_local.py.
@pytest.mark.parametrize("victim", [1])
def test_a_peer_that_dies_stops_the_other_with_43(tmp_path, reference, victim):  # noqa: F811
  """SIGKILL one of two processes (its training process dies with it): the survivor exits
  43 in one line within the heartbeat timeout (20 s here), jax's dump in a report file;
  the same command resumes."""
  workdir = str(tmp_path / "run")
  job = Job(workdir, n=2, devices=2)
  _wait_for(_logged(workdir, 4), job, "step 4 logged")
  job.procs[victim].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  survivor = job.procs[1 - victim]
  code = survivor.wait(timeout=120)
  elapsed = time.monotonic() - killed
  job.wait()
  out = job.output(1 - victim)
  assert code == 43, job.all_output()
  assert elapsed < 20 + 30, elapsed
  last = out.strip().splitlines()[-1]
  assert last.startswith("peer lost: "), job.all_output()
  assert "Check failure" not in out and "*** " not in out, out[-3000:]
  if victim == 1:
    restart = Job(workdir, n=2, devices=2)
    assert restart.wait() == [0, 0], restart.all_output()
    _assert_same_losses(workdir, reference)
  assert STEPS == 12


def test_a_stop_whose_save_cannot_commit_in_the_grace_period_exits_42_before_the_kill(
    tmp_path):
  """GKE Spot: 15 s from SIGTERM to SIGKILL. A save that cannot commit by then (staged: orbax
  reports every save as still in progress) is given up, and the process exits 42 in time,
  saying where the restart resumes, instead of being killed mid-save (137)."""
  workdir, grace = str(tmp_path / "run"), 8
  wrap = ("import os; os.environ['MM_JAX_NO_SUPERVISOR'] = '1'; "  # the patch stays in-process
          "import orbax.checkpoint as ocp; "
          "ocp.CheckpointManager.is_saving_in_progress = lambda self: True; "
          "import time, mm_jax.heartbeat as hb; beat = hb.beat; "  # slow steps: still running
          "hb.beat = lambda *a, **k: (time.sleep(0.2), beat(*a, **k))[1]")
  job = Job(workdir, wrap=wrap, flags=(f"--config.train.stop_grace_s={grace}",))
  _wait_for(_logged(workdir, 4), job, "step 4 logged")
  job.procs[0].send_signal(signal.SIGTERM)
  sent = time.monotonic()
  code = job.procs[0].wait(timeout=120)
  elapsed = time.monotonic() - sent
  job.wait()
  assert code == 42, job.all_output()
  assert elapsed < grace, elapsed
  out = job.output()
  assert f"could not commit within config.train.stop_grace_s={grace} s of the SIGTERM" in out
  last = _last_line(job)
  assert f"nothing saved in the {grace} s before the kill; resumes from" in last, last
