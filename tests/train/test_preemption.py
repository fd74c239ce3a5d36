"""Real processes through main.py: 2 processes x 2 CPU devices (gloo) against 1 x 4.

Every run is the tiny preset for 12 steps, a checkpoint every 3, every step logged. The
reference is one uninterrupted 1-process run; every other run must log the same loss at
every step (rtol 1e-5: only the cross-process reduction order differs):
- SIGTERM to process 1 of 2: both processes save the same step and exit 42; the restart,
  in ONE process, resumes from it (2 -> 1 resharding) and matches.
- a 1-process checkpoint resumed by 2 processes (1 -> 2) matches.
- SIGKILL while an async save is being written: the restart matches.
Children have hard timeouts and are killed on failure; their logs are in the assertion.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 12
FLAGS = ["--config=configs/llava.py:tiny", f"--config.train.steps={STEPS}",
         "--config.train.log_every=1", "--config.checkpoint.every=3",
         "--config.checkpoint.keep=10", "--config.data.num_eval=32",
         "--config.eval.generate=False"]
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """`n` processes of main.py on one workdir, each with `devices` CPU devices."""

  def __init__(self, workdir, n: int = 1, devices: int = 4, wrap: str = "",
               flags: tuple[str, ...] = ()):
    self.workdir, port = str(workdir), _free_port()
    os.makedirs(self.workdir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    self.logs, self.procs = [], []
    for i in range(n):
      argv = ["main.py", f"--workdir={self.workdir}", *FLAGS, *flags]
      # wrap: Python run before main.py in the child (runpy keeps main.py's __main__).
      args = ([sys.executable, "-c", f"{wrap}; import runpy, sys; sys.argv = {argv!r}; "
               "runpy.run_path('main.py', run_name='__main__')"] if wrap
              else [sys.executable, *argv])
      if n > 1:
        args += [f"--coordinator=127.0.0.1:{port}", f"--num_processes={n}",
                 f"--process_id={i}", "--heartbeat_timeout_s=20", "--distributed_timeout_s=120"]
      log = open(os.path.join(self.workdir, f"log_{len(os.listdir(self.workdir))}_{i}.txt"),  # noqa: SIM115
                 "w+")
      self.logs.append(log)
      self.procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT))

  def wait(self) -> list[int]:
    deadline = time.time() + TIMEOUT_S
    try:
      return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]
    finally:
      self.kill()

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def child(self, i: int = 0) -> int:
    """The pid of process i's training process (main.py runs it under a supervisor)."""
    pid = self.procs[i].pid
    deadline = time.time() + 60
    while time.time() < deadline:
      try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
          children = f.read().split()
      except FileNotFoundError:
        children = []
      if children:
        return int(children[0])
      time.sleep(0.01)
    raise AssertionError(f"process {i} started no training process")

  def output(self, i: int = 0) -> str:
    self.logs[i].seek(0)
    return self.logs[i].read()

  def all_output(self) -> str:
    return "\n".join(f"--- process {i}\n{self.output(i)[-3000:]}" for i in range(len(self.procs)))


def _losses(workdir) -> dict[int, float]:
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in records if "loss" in r]
  assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _wait_for(predicate, job: Job, what: str, timeout: float = TIMEOUT_S) -> None:
  deadline = time.time() + timeout
  while not predicate():
    if time.time() > deadline or any(p.poll() is not None for p in job.procs):
      job.kill()
      pytest.fail(f"never saw {what}:\n{job.all_output()}")
    time.sleep(0.005)


def _checkpoints(workdir) -> list[str]:
  path = os.path.join(workdir, "checkpoints")
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


_REFERENCE: dict = {}  # test_faults.py imports the fixture: one run for both modules


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 1-process, 4-device run (once per session)."""
  if "run" not in _REFERENCE:
    workdir = tmp_path_factory.mktemp("reference")
    job = Job(workdir)
    assert job.wait() == [0], job.all_output()
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    _REFERENCE["run"] = str(workdir), losses
  return _REFERENCE["run"]


def _assert_same_losses(workdir, reference, rtol: float = 1e-5) -> None:
  got, want = _losses(workdir), reference[1]
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=rtol)


def test_sigterm_to_one_of_two_processes_saves_one_step_and_resumes_in_one(tmp_path,
                                                                            reference):
  workdir = str(tmp_path / "run")
  job = Job(workdir, n=2, devices=2)
  metrics = os.path.join(workdir, "metrics.jsonl")
  _wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 4, job,
            "step 4 logged")
  job.procs[1].send_signal(signal.SIGTERM)
  assert job.wait() == [42, 42], job.all_output()
  said = [next(line for line in job.output(i).splitlines() if line.startswith("preempted"))
          for i in range(2)]
  steps = {int(s.split("saved step ")[1].split(";")[0]) for s in said}
  assert len(steps) == 1, said  # the same step on both processes
  (step,) = steps
  assert "by SIGTERM" in said[1] and "another process" in said[0]
  assert str(step) in _checkpoints(workdir) and step < STEPS
  data_state = os.listdir(os.path.join(workdir, "checkpoints", str(step), "data"))
  assert len([f for f in data_state if f.startswith("process_")]) == 2  # one per process

  restart = Job(workdir, n=1, devices=4)  # 2 processes -> 1: the state is resharded
  assert restart.wait() == [0], restart.all_output()
  assert f"resumed from step {step}" in restart.output()
  _assert_same_losses(workdir, reference)
  with open(os.path.join(workdir, "goodput.jsonl")) as f:
    events = [json.loads(line)["event"] for line in f]
  assert "preempted" in events and events.count("start") == 2


def test_one_process_checkpoint_resumes_in_two(tmp_path, reference):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  for step in _checkpoints(workdir):
    if int(step) > 6:
      shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  job = Job(workdir, n=2, devices=2)
  assert job.wait() == [0, 0], job.all_output()
  assert "resumed from step 6" in job.output(0)
  _assert_same_losses(workdir, reference)


def test_sigkill_during_an_async_save_loses_nothing_committed(tmp_path, reference):
  workdir = str(tmp_path / "run")
  job = Job(workdir)
  # orbax writes a step into "<step>.orbax-checkpoint-tmp-*" and renames it when complete.
  in_flight = lambda: any("tmp" in d and not d.startswith("3") for d in _checkpoints(workdir))
  _wait_for(in_flight, job, "an async save in flight (tmp folder)")
  job.procs[0].send_signal(signal.SIGKILL)
  job.wait()
  restart = Job(workdir)
  assert restart.wait() == [0], restart.all_output()
  assert not any("tmp" in d for d in _checkpoints(workdir))  # orbax cleaned the torn save
  _assert_same_losses(workdir, reference, rtol=0)  # same devices: bit for bit


def test_a_save_that_fails_stops_the_run_at_once_with_the_previous_checkpoint_intact(
    tmp_path):
  """A full disk, for real: after the step-3 checkpoint commits, the process may write no
  file beyond 256 KiB (RLIMIT_FSIZE; main.py ignores SIGXFSZ, so writes fail with EFBIG, as they
  fail with ENOSPC on a full disk). The step-6 save fails in orbax's background thread."""
  import resource

  workdir = str(tmp_path / "run")
  job = Job(workdir)
  _wait_for(lambda: "3" in _checkpoints(workdir), job, "checkpoint 3 committed")
  resource.prlimit(job.child(), resource.RLIMIT_FSIZE, (1 << 18, 1 << 18))
  assert job.wait() == [1], job.all_output()
  last = job.output().strip().splitlines()[-1]
  assert last.startswith("checkpoint error: checkpoint step 6 failed to save ("), last
  assert last.endswith(f"newest intact checkpoint: step 3 in {workdir}/checkpoints"), last
  assert "step 9/" not in job.output()  # stopped at the failed save, not an interval later
  assert _checkpoints(workdir)[0] == "3"
  restart = Job(workdir)  # the limit is gone: the run resumes from 3 and finishes
  assert restart.wait() == [0], restart.all_output()
  assert "resumed from step 3" in restart.output()
