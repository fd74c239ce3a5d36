"""WorkdirLock: a second run on a held workdir stops in one line naming the holder.

"Another run" is a real process (a `python -c` child that prints a line once it holds the
lock, then sleeps), killed in a finally. Lease tests force mode="lease" on a local folder
with a 1 s lease. Timing asserts only bound from above, generously (a loaded 2-core box);
outcomes are asserted through the log lines and the lock file, not through durations.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from mm_jax.config.checks import ConfigError
from mm_jax.train import lock as lock_lib
from mm_jax.train.lock import LOCK_FILE, WorkdirBusy, WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEASE = {"mode": "lease", "lease_s": 1.0, "poll_s": 0.1, "settle_s": 0.1}
SLACK_S = 15.0  # upper bounds only: a child's start and a loaded machine's scheduling

# argv: workdir, WorkdirLock kwargs (json)[, start file, check file]. Prints READY holding
# the lock, or BUSY and the message. With files: waits for the start file before acquiring,
# and once holding, for the check file, then prints whether held() is still true.
_HOLDER = """
import json, os, sys, time
from mm_jax.train.lock import WorkdirBusy, WorkdirLock
def wait_for(path):
  while not os.path.exists(path):
    time.sleep(0.001)
lock = WorkdirLock(sys.argv[1], log=lambda m: print(m, file=sys.stderr),
                   **json.loads(sys.argv[2]))
if len(sys.argv) > 3:
  print("WAITING", flush=True)
  wait_for(sys.argv[3])
try:
  lock.acquire()
except WorkdirBusy as e:
  print("BUSY", e, flush=True)
else:
  print("READY", flush=True)
  if len(sys.argv) > 4:
    wait_for(sys.argv[4])
    print("HELD", lock.held(), flush=True)
time.sleep(120)
"""

# argv: workdir. flock without writing a record: the holder is unknown.
_BARE_FLOCK = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".mm_jax.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("READY", flush=True)
time.sleep(120)
"""

# argv: workdir. Holds the lock, forks a worker (which prints its pid once it runs, so after
# the fork handlers) and dies by SIGKILL; the worker sleeps on.
_FORK_THEN_DIE = """
import os, signal, sys, time
from mm_jax.train.lock import WorkdirLock
lock = WorkdirLock(sys.argv[1]).acquire()
if os.fork() == 0:
  print(os.getpid(), flush=True)
  time.sleep(120)
  os._exit(0)
os.kill(os.getpid(), signal.SIGKILL)
"""


class Child:
  """A `python -c` process whose stdout lines arrive on a queue (reads never block)."""

  def __init__(self, code: str, *args: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    self.proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, text=True)
    self.pid = self.proc.pid
    self.lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self) -> None:
    for line in self.proc.stdout:
      self.lines.put(line.rstrip("\n"))

  def line(self, timeout: float = 60.0) -> str:
    try:
      return self.lines.get(timeout=timeout)
    except queue.Empty:
      raise AssertionError(f"child {self.pid}: no line in {timeout} s "
                           f"(exit code {self.proc.poll()})") from None

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait(timeout=30)


@pytest.fixture
def spawn():
  children: list[Child] = []

  def start(code: str, *args: str) -> Child:
    children.append(Child(code, *args))
    return children[-1]

  try:
    yield start
  finally:
    for c in children:
      c.kill()


def _holder(spawn, workdir, **kw) -> Child:
  child = spawn(_HOLDER, str(workdir), json.dumps(kw))
  assert child.line() == "READY"
  return child


def _record(workdir) -> dict:
  with open(os.path.join(workdir, LOCK_FILE)) as f:
    return json.load(f)


def _write_record(workdir, **fields) -> dict:
  rec = {"id": uuid.uuid4().hex, "host": "elsewhere-7", "pid": 4242,
         "since": "2024-01-01T00:00:00+00:00", "renewed": 1000.0, **fields}
  with open(os.path.join(workdir, LOCK_FILE), "w") as f:
    json.dump(rec, f)
  return rec


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_mode_follows_the_path(tmp_path):
  assert WorkdirLock(str(tmp_path)).mode == "flock"
  assert WorkdirLock("gs://bucket/run").mode == "lease"
  assert WorkdirLock("gs://bucket/run").path == "gs://bucket/run/" + LOCK_FILE
  with pytest.raises(ValueError, match="remote"):
    WorkdirLock("gs://bucket/run", mode="flock")
  with pytest.raises(ValueError, match="mode"):
    WorkdirLock(str(tmp_path), mode="posix")


# -- flock


def test_flock_busy_names_the_holder_in_one_line(tmp_path, spawn):
  child = _holder(spawn, tmp_path)
  with pytest.raises(WorkdirBusy) as e:
    WorkdirLock(str(tmp_path)).acquire()
  msg = str(e.value)
  assert isinstance(e.value, ConfigError) and "\n" not in msg
  assert msg.startswith(f"--workdir={tmp_path} is in use by another run (host ")
  assert f"host {socket.gethostname()}, pid {child.pid}, since " in msg
  assert f"lock {tmp_path / LOCK_FILE}" in msg and msg.endswith("use another --workdir")
  assert e.value.holder["pid"] == child.pid and e.value.path == str(tmp_path / LOCK_FILE)
  assert _record(tmp_path)["pid"] == child.pid  # the loser wrote nothing


def test_flock_busy_without_a_record_says_holder_unknown(tmp_path, spawn):
  child = spawn(_BARE_FLOCK, str(tmp_path))
  assert child.line() == "READY"
  with pytest.raises(WorkdirBusy, match=r"\(holder unknown; lock "):
    WorkdirLock(str(tmp_path)).acquire()


def test_flock_is_free_at_once_after_the_holder_is_sigkilled(tmp_path, spawn):
  child = _holder(spawn, tmp_path)
  child.proc.send_signal(signal.SIGKILL)
  child.proc.wait(timeout=30)
  lock = WorkdirLock(str(tmp_path), log=pytest.fail)  # nothing to wait for, nothing to say
  with lock:
    assert lock.held() and _record(tmp_path)["pid"] == os.getpid()


def test_flock_release_reacquire_and_idempotent_release(tmp_path):
  lock = WorkdirLock(str(tmp_path / "new" / "run"))  # acquire makes the folder
  assert not lock.held()
  assert lock.acquire() is lock and lock.held()
  assert lock.acquire() is lock  # held already: a no-op
  rec = _record(lock.workdir)
  assert set(rec) == {"id", "host", "pid", "since", "renewed"}
  assert rec["host"] == socket.gethostname() and rec["since"].endswith("+00:00")
  with pytest.raises(WorkdirBusy):  # another open file in this process is another holder
    WorkdirLock(lock.workdir).acquire()
  lock.release()
  lock.release()
  assert not lock.held() and os.path.exists(lock.path)  # the file stays in flock mode
  other = WorkdirLock(lock.workdir).acquire()
  other.release()
  lock.acquire()
  assert lock.held() and _record(lock.workdir)["id"] != rec["id"]
  lock.release()


def test_flock_is_not_kept_by_a_forked_worker_of_a_dead_run(tmp_path, spawn):
  child = spawn(_FORK_THEN_DIE, str(tmp_path))
  worker = int(child.line())
  try:
    child.proc.wait(timeout=30)
    assert lock_lib._pid_alive(worker)
    WorkdirLock(str(tmp_path)).acquire().release()
  finally:
    os.kill(worker, signal.SIGKILL)


def test_unlockable_workdir_is_one_config_error(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match="cannot lock") as e:
    WorkdirLock(str(tmp_path / "file")).acquire()
  assert "\n" not in str(e.value)


# -- lease


def test_lease_live_holder_is_busy_within_the_lease(tmp_path, spawn):
  # The holder renews every 0.1 s (lease 0.3 s): it shows it is alive well within our 1 s.
  child = _holder(spawn, tmp_path, mode="lease", lease_s=0.3, poll_s=0.1, settle_s=0.1)
  logs: list[str] = []
  start = time.monotonic()
  with pytest.raises(WorkdirBusy) as e:
    WorkdirLock(str(tmp_path), log=logs.append, **LEASE).acquire()
  assert time.monotonic() - start < LEASE["lease_s"] + SLACK_S
  assert f"host {socket.gethostname()}, pid {child.pid}, since " in str(e.value)
  assert "\n" not in str(e.value)
  assert logs == [f"lock: {tmp_path} is held by host {socket.gethostname()} pid {child.pid}; "
                  "waiting up to 1 s to see whether it is alive"]
  assert _record(tmp_path)["pid"] == child.pid


def test_lease_holder_renews_while_it_settles(tmp_path, spawn):
  # A starter renews from its first write: one that is still in its settle_s (here longer
  # than our lease) when we look is alive, not stale.
  child = spawn(_HOLDER, str(tmp_path), json.dumps(dict(LEASE, settle_s=2.0)))
  deadline = time.monotonic() + SLACK_S
  while not os.path.exists(tmp_path / LOCK_FILE):
    assert time.monotonic() < deadline, "the child never wrote its record"
    time.sleep(0.01)
  with pytest.raises(WorkdirBusy, match=f"pid {child.pid}, since "):
    WorkdirLock(str(tmp_path), log=lambda m: None, **LEASE).acquire()
  assert child.line() == "READY"


def test_lease_stale_record_from_another_host_is_taken_over(tmp_path):
  old = _write_record(tmp_path)
  logs: list[str] = []
  lock = WorkdirLock(str(tmp_path), log=logs.append, **LEASE)
  start = time.monotonic()
  lock.acquire()
  try:
    took = time.monotonic() - start
    assert LEASE["lease_s"] <= took < LEASE["lease_s"] + SLACK_S  # it watched a whole lease
    assert logs == [
      f"lock: {tmp_path} is held by host elsewhere-7 pid 4242; waiting up to 1 s to see "
      "whether it is alive",
      "lock: took over from a run that stopped renewing its lease (host elsewhere-7, "
      "pid 4242)"]
    rec = _record(tmp_path)
    assert rec["id"] != old["id"] and rec["pid"] == os.getpid() and lock.held()
  finally:
    lock.release()
  assert not os.path.exists(lock.path)


def test_lease_dead_pid_on_this_host_is_taken_over_at_once(tmp_path):
  _write_record(tmp_path, host=socket.gethostname(), pid=_dead_pid())
  logs: list[str] = []
  with WorkdirLock(str(tmp_path), log=logs.append, **LEASE) as lock:
    assert lock.held()
    assert len(logs) == 1 and logs[0].startswith("lock: took over from a run that is gone (")
    assert f"host {socket.gethostname()}, pid " in logs[0]


def test_lease_live_pid_or_other_pid_namespace_is_watched_not_taken(tmp_path):
  # A same-host record whose pid lives, or that comes from another container (pid
  # namespace), is not known to be dead: it is watched for a lease before a takeover.
  for fields in [{"pid": os.getpid()}, {"pid": _dead_pid(), "pidns": "pid:[1]"}]:
    _write_record(tmp_path, host=socket.gethostname(), **fields)
    logs: list[str] = []
    with WorkdirLock(str(tmp_path), log=logs.append, **LEASE):
      assert "waiting up to 1 s" in logs[0] and "stopped renewing" in logs[1]


def test_lease_renews_release_deletes_and_release_is_idempotent(tmp_path):
  lock = WorkdirLock(str(tmp_path), **dict(LEASE, lease_s=0.3)).acquire()
  first = _record(tmp_path)
  assert first["lease_s"] == 0.3
  deadline = time.monotonic() + SLACK_S
  while _record(tmp_path)["renewed"] == first["renewed"]:
    assert time.monotonic() < deadline, "the lease was never renewed"
    time.sleep(0.05)
  assert _record(tmp_path)["id"] == first["id"]
  lock.release()
  assert not os.path.exists(lock.path) and not lock.held()
  lock.release()
  assert not os.path.exists(lock.path)


def test_lease_held_is_false_once_another_run_overwrote_the_record(tmp_path):
  lock = WorkdirLock(str(tmp_path), **dict(LEASE, lease_s=0.3)).acquire()
  try:
    assert lock.held()
    other = _write_record(tmp_path)
    # The renew thread may have read our record just before that write and then rewrite
    # it; it stops for good once it reads another id. Overwrite until it has.
    deadline = time.monotonic() + SLACK_S
    while lock._thread.is_alive():
      assert time.monotonic() < deadline, "the renew thread kept going"
      if _record(tmp_path)["id"] != other["id"]:
        other = _write_record(tmp_path)
      time.sleep(0.02)
    if _record(tmp_path)["id"] != other["id"]:
      other = _write_record(tmp_path)
    assert not lock.held()
  finally:
    lock.release()
  assert _record(tmp_path) == other  # release leaves another run's record alone


def test_lease_concurrent_starters_exactly_one_holds(tmp_path, spawn):
  # Started together (one start file), both find the workdir free and write; after
  # settle_s each reads back: the last writer holds it, the other is busy. Should a loaded
  # machine stall one writer past the other's settle_s, both pass the read-back and the
  # earlier one finds out in held() (what callers check before each checkpoint): so
  # "holds" here is held() once both have answered.
  go, check, run = tmp_path / "go", tmp_path / "check", tmp_path / "run"
  kw = json.dumps(dict(LEASE, settle_s=1.0))
  a, b = (spawn(_HOLDER, str(run), kw, str(go), str(check)) for _ in range(2))
  assert a.line() == b.line() == "WAITING"
  go.write_text("")
  outcome = {c.pid: c.line() for c in (a, b)}
  check.write_text("")
  held = {c.pid: c.line() for c in (a, b) if outcome[c.pid] == "READY"}
  holders = [pid for pid, line in held.items() if line == "HELD True"]
  assert len(holders) == 1, (outcome, held)
  assert _record(run)["pid"] == holders[0]
  for pid, line in outcome.items():
    if line.startswith("BUSY "):
      assert f"pid {holders[0]}, since " in line
    else:
      assert line == "READY" and held[pid] == ("HELD True" if pid == holders[0]
                                               else "HELD False"), (outcome, held)
