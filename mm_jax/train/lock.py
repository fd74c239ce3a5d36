"""One writer per training workdir: a second run on the same --workdir stops in one line.

Two runs on one workdir both wrote checkpoints and corrupted each other, so a run takes
this lock before it touches the workdir and holds it for its whole life.

- flock (local disks, NFS): `fcntl.flock` on WORKDIR/.mm_jax.lock, whose text names the
  holder. The kernel drops the lock when the process dies, even on SIGKILL, so a crashed
  run never blocks the next. The file is never deleted (that races with a new opener).
- lease (object stores have no locks): the object WORKDIR/.mm_jax.lock holds the holder's
  record, rewritten with a fresh "renewed" every lease_s/3. A newcomer that finds a record
  watches "renewed" for lease_s on its own monotonic clock (two hosts' wall clocks are
  never compared): it changes, the holder is alive; it does not, the holder is gone and
  the newcomer takes over. Two starters at once both write, wait settle_s and read back:
  the last write wins. A lease is advisory: callers check `held()` before each checkpoint.

In a multi-process (multi-host) run only one process should take it (process 0): the
others would find it held.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
import weakref

import jax
import numpy as np
from jax.experimental import multihost_utils

from mm_jax import paths
from mm_jax.config.checks import ConfigError

LOCK_FILE = ".mm_jax.lock"
MODES = ("flock", "lease")


class WorkdirBusy(ConfigError):
  """Another run holds the workdir; the message (one line) names it and the lock file."""

  def __init__(self, message: str, holder: dict | None = None, path: str | None = None):
    super().__init__(message)
    self.holder, self.path = holder, path


def _busy(workdir: str, path: str, holder: dict | None) -> WorkdirBusy:
  msg = (f"--workdir={workdir} is in use by another run ({_describe(holder)}; lock {path}): "
         "stop it, or use another --workdir")
  return WorkdirBusy(_one_line(msg), holder, path)


def _one_line(text) -> str:
  return str(text).replace("\r", " ").replace("\n", " ")


def _describe(holder: dict | None) -> str:
  if not holder:
    return "holder unknown"
  return f"{_who(holder)}, since {_one_line(holder.get('since', '?'))}"


def _who(holder: dict) -> str:
  return f"host {_one_line(holder.get('host', '?'))}, pid {_one_line(holder.get('pid', '?'))}"


def _parse(text: str) -> dict | None:
  """The holder record, or None for an empty or unparsable file (which holds nothing)."""
  try:
    rec = json.loads(text)
  except ValueError:
    return None
  return rec if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None


def _pid_alive(pid) -> bool:
  """False only when `pid` surely names no process here (an odd pid counts as alive)."""
  try:
    pid = int(pid)
    if pid <= 0:  # 0 and -1 would signal a process group / every process
      return True
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (OSError, ValueError, TypeError, OverflowError):
    return True
  return True


def _pid_namespace() -> str:
  """Two containers can share a host name but not pids: a dead-pid check needs both."""
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return ""


def _now_iso() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# A forked child (a multiprocessing worker) inherits every held lock: it must not release
# them (a lease delete, or LOCK_UN, would free the parent's), and must not keep the flock's
# descriptor, or a SIGKILLed run's orphaned workers would go on holding the workdir.
_HELD: weakref.WeakSet[WorkdirLock] = weakref.WeakSet()


def _forget_in_child() -> None:
  for lock in list(_HELD):
    fd, lock._fd, lock._record, lock._stop, lock._thread = lock._fd, None, None, None, None
    if fd is not None:
      try:
        os.close(fd)  # closes this process's copy only; the parent's flock stays
      except OSError:
        pass
  _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class WorkdirLock:
  """The lock on one workdir. `mode` None: "flock" for a local path, "lease" for a remote
  one. `log` gets one line per takeover or wait, so a run that waits says why."""

  def __init__(self, workdir: str, *, mode: str | None = None, lease_s: float = 60.0,
               poll_s: float = 2.0, settle_s: float = 2.0, log=print):
    if mode is None:
      mode = "lease" if paths.is_remote(workdir) else "flock"
    if mode not in MODES:
      raise ValueError(f"WorkdirLock mode: {mode!r} is not one of {MODES}")
    if mode == "flock" and paths.is_remote(workdir):
      raise ValueError(f"WorkdirLock: {workdir} is remote; flock needs a local path")
    if not (lease_s > 0 and poll_s > 0 and settle_s >= 0):
      raise ValueError(f"WorkdirLock: lease_s={lease_s} and poll_s={poll_s} must be > 0, "
                       f"settle_s={settle_s} >= 0")
    self.workdir, self.mode, self.log = workdir, mode, log
    self.path = paths.join(workdir, LOCK_FILE)
    self.lease_s, self.poll_s, self.settle_s = float(lease_s), float(poll_s), float(settle_s)
    self._record: dict | None = None  # ours, while held
    self._fd: int | None = None  # flock
    self._stop: threading.Event | None = None  # lease: the renew thread's
    self._thread: threading.Thread | None = None

  # -- the API

  def acquire(self) -> WorkdirLock:
    """Holds the workdir, or raises WorkdirBusy naming the run that does (ConfigError for a
    workdir that cannot be locked at all). Holding it already is fine."""
    if self._record is not None:
      return self
    rec = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
           "since": _now_iso(), "renewed": time.time()}
    try:
      paths.makedirs(self.workdir)
      if self.mode == "flock":
        self._acquire_flock(rec)
      else:
        rec.update(lease_s=self.lease_s, pidns=_pid_namespace())
        self._acquire_lease(rec)
    except ImportError as e:  # a gs:// workdir without gcsfs
      raise ConfigError(f"--workdir={self.workdir}: {e}") from None
    except OSError as e:
      raise ConfigError(f"--workdir={self.workdir}: cannot lock {self.path} "
                        f"({e.strerror or e})") from None
    return self

  def held(self) -> bool:
    """flock: acquired and not released. lease: the object still carries our id (read
    again: a run whose lease lapsed may have been taken over)."""
    if self._record is None:
      return False
    if self.mode == "flock":
      return self._fd is not None
    for attempt in range(3):  # one failed read must not end a week-long run
      try:
        cur = self._read()
        return cur is not None and cur["id"] == self._record["id"]
      except Exception:
        if attempt == 2:
          return False
        time.sleep(min(self.poll_s, 1.0))
    return False

  def release(self) -> None:
    """Lets the workdir go: idempotent, never raises (it runs in finally blocks)."""
    rec, self._record = self._record, None
    _HELD.discard(self)
    try:
      if self.mode == "flock":
        self._release_flock()
      else:
        self._stop_renewing()
        if rec is not None:
          cur = self._read()
          if cur is not None and cur["id"] == rec["id"]:
            paths.remove(self.path)
    except Exception:  # best effort
      pass

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  # -- flock

  def _acquire_flock(self, rec: dict) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK: another open file holds it
      holder = _parse(_read_fd(fd))
      os.close(fd)
      raise _busy(self.workdir, self.path, holder) from None
    except BaseException:
      os.close(fd)
      raise
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
      os.fsync(fd)  # an NFS client on another host reads the server's copy
    except BaseException:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
      raise
    self._fd, self._record = fd, rec
    _HELD.add(self)

  def _release_flock(self) -> None:
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  # -- lease

  def _read(self) -> dict | None:
    try:
      return _parse(paths.read_text(self.path, errors="replace"))
    except FileNotFoundError:
      return None

  def _write(self, rec: dict) -> None:
    paths.write_text(self.path, json.dumps(dict(rec, renewed=time.time())) + "\n")

  def _acquire_lease(self, rec: dict) -> None:
    cur = self._read()
    if cur is not None:
      if self._gone(cur):
        self.log(f"lock: took over from a run that is gone ({_who(cur)})")
      else:
        cur = self._watch(cur)
        if cur is not None:
          self.log(f"lock: took over from a run that stopped renewing its lease ({_who(cur)})")
    self._write(rec)
    # Renewing from the first write, not from the read-back: a newcomer that watches us
    # during settle_s must see a live holder (else settle_s + lease_s/3 > lease_s loses it).
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, args=(rec, self._stop), daemon=True,
                                    name=f"mm_jax lock renew {self.workdir}")
    self._thread.start()
    try:
      if self.settle_s:
        time.sleep(self.settle_s)
      back = self._read()
    except BaseException:
      self._stop_renewing()
      raise
    if back is None or back["id"] != rec["id"]:  # a concurrent starter wrote after us
      self._stop_renewing()
      raise _busy(self.workdir, self.path, back)
    self._record = rec
    _HELD.add(self)

  def _gone(self, cur: dict) -> bool:
    """The holder ran on this host, in this pid namespace, and its pid is dead."""
    return (cur.get("host") == socket.gethostname()
            and cur.get("pidns", "") in ("", _pid_namespace())
            and not _pid_alive(cur.get("pid")))

  def _watch(self, cur: dict) -> dict | None:
    """Raises WorkdirBusy once the holder renews; returns the record it left unrenewed for
    the whole lease (stale), or None when it went away meanwhile (free)."""
    wait = self.lease_s
    try:  # a holder that renews less often than we would wait is given its own lease
      wait = max(wait, min(float(cur.get("lease_s", 0)), 10 * self.lease_s))
    except (TypeError, ValueError):
      pass
    self.log(f"lock: {self.workdir} is held by host {_one_line(cur.get('host', '?'))} pid "
             f"{_one_line(cur.get('pid', '?'))}; waiting up to {wait:g} s to see whether it "
             "is alive")
    seen = (cur["id"], cur.get("renewed"))
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
      time.sleep(min(self.poll_s, left))
      now = self._read()
      if now is None:
        return None
      if (now["id"], now.get("renewed")) != seen:
        raise _busy(self.workdir, self.path, now)
    return cur

  def _renew(self, rec: dict, stop: threading.Event) -> None:
    while not stop.wait(self.lease_s / 3):
      try:
        cur = self._read()
        if cur is None or cur["id"] != rec["id"]:
          return  # taken over: never write over the new holder's record
        self._write(rec)
      except Exception:  # a lapse shows in held()
        pass

  def _stop_renewing(self) -> None:
    stop, thread, self._stop, self._thread = self._stop, self._thread, None, None
    if stop is not None:
      stop.set()
    if thread is not None and thread is not threading.current_thread():
      thread.join(timeout=max(self.lease_s, 10.0))


def _read_fd(fd: int) -> str:
  try:
    return os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")
  except OSError:
    return ""


class _Unlocked:
  """What processes other than 0 hold: process 0 holds the job's lock."""

  path = ""

  def held(self) -> bool:
    return True

  def release(self) -> None:
    pass


@contextlib.contextmanager
def job_lock(workdir: str, log=print):
  """The workdir's lock for the whole job, held by process 0 (WorkdirLock). Every
  process learns whether it was taken (one all-gather), so a second job stops on every
  process with the holder named, before its Checkpointer cleans orbax's temporary folders
  under the first one's feet."""
  error = None
  lock = _Unlocked()
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, log=log).acquire()
    except ConfigError as e:
      error = e
  if jax.process_count() > 1:
    got = multihost_utils.process_allgather(np.array([error is None]))
    if not np.all(got) and error is None:
      error = WorkdirBusy(f"--workdir={workdir}: process 0 could not lock it (its message "
                          "names the holder)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()
