"""The supervisor: main.py runs a training command as a child process and watches it.

Why a parent process at all: when jax.distributed sees a peer die it aborts the process from
C++ (LOG(FATAL) -> SIGABRT) with ~70 lines of stack dump, and no Python code runs after that.
Only another process can turn it into one line and an exit code a scheduler can act on. Being
the parent also lets it
  - forward SIGTERM/SIGINT to the child from the child's first instant (before the child has
    imported anything, let alone installed handlers), once: the child has its own process
    group, so a terminal's Ctrl-C reaches only the parent (a scheduler that signals every
    process of the job, as Slurm does, still reaches the child directly too);
  - end a child that stopped making progress (the watchdog; the child reports progress through
    a pipe with mm_jax/heartbeat.py);
  - take the child down with it however it dies (PR_SET_PDEATHSIG), even by SIGKILL.

The child's stderr passes through line by line. From a fatal marker on (a glog FATAL line,
"Fatal Python error", ...) the lines go to a report file instead of the console. jax logs an
error or two just before its fatal line ("Polled an error from coordination service"): those
are held back for a few seconds, and join the report if the fatal line follows.

Exit codes, on top of the child's own (mm_jax/faults.py), which pass through unchanged:
  42  a forwarded SIGTERM/SIGINT killed the child before it installed handlers: nothing to save.
  43  (EXIT_LOST) a peer died, or the watchdog ended a stalled run; nothing was saved by this
      attempt. Restart: the same command resumes from the newest checkpoint.
  128 + N  killed by any other signal N (137: SIGKILL, often the OOM killer).

Stdlib only, and cheap to import: main.py imports it before jax and absl.
"""

from __future__ import annotations

import collections
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import time

# mm_jax.faults is stdlib-only too. EXIT_LOST: restartable, a peer died or the run stalled.
from mm_jax.faults import EXIT_LOST, EXIT_PREEMPTED

ENV_SUPERVISED = "MM_JAX_SUPERVISED"  # set in the child: it must not supervise itself again
ENV_BEAT_FD = "MM_JAX_BEAT_FD"  # the child's end of the progress pipe
ENV_OFF = "MM_JAX_NO_SUPERVISOR"  # =1: run in this process (e.g. to debug with breakpoint())

_JAX_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
_FATAL = re.compile(re.escape(_JAX_FATAL) +
                    r"|\*\*\* Check failure stack trace|Fatal Python error|^F\d{4} ")
_PEER = re.compile(r"JAX distributed service detected fatal errors|another task died|"
                   r"coordination service", re.IGNORECASE)
# jax logs errors just before it aborts: held back from the console a moment (_HOLD_S).
_OMEN = re.compile(r"Polled an error from coordination service|Use error polling to propagate")
_TASK = re.compile(r"/job:[^/]+/replica:\d+/task:(\d+)")  # a task name (older jax)
_TASK_ID = re.compile(r"\s*(\d+)\s*")  # a task name (jax >= 0.9: its number alone)
_GLOG_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ [^\]]*\] ")
_HELP = {"help", "helpfull", "helpshort", "helpxml", "?"}
_RING = 200  # stderr lines kept for the report's context and for reading what happened
_POLL_S = 0.25  # how often the loop looks for an exited child whose pipes stay open
_HOLD_S = 5.0  # how long lines after an omen wait for a fatal line (it comes within ms)


def _flags(argv: list[str]) -> dict:
  """The flags of main.py's argv that decide supervision, read like absl reads them: the last
  occurrence wins, `--name value` as `--name=value`, `--noname` clears a bool."""
  seen = {"mode": "train", "target": "", "workdir": "", "dry_run": False, "print_config": False,
          "help": False}
  args = iter(argv[1:])
  for arg in args:
    if arg == "--":
      break
    if not arg.startswith("-"):
      continue
    name, eq, value = arg.lstrip("-").partition("=")
    if name in ("mode", "target", "workdir"):
      seen[name] = value if eq else next(args, "")
    elif name in ("dry_run", "print_config"):
      seen[name] = not eq or value.lower() in ("true", "t", "1")
    elif name in ("nodry_run", "noprint_config"):
      seen[name[2:]] = False
    elif name in _HELP:
      seen["help"] = True
  return seen


def training(argv: list[str]) -> bool:
  """Whether main.py's argv (sys.argv) trains: --mode train (the default), and none of
  --dry_run, --target, --print_config or a help flag."""
  f = _flags(argv)
  return f["mode"] == "train" and not (f["target"] or f["dry_run"] or f["print_config"]
                                       or f["help"])


def wanted(argv: list[str], env=os.environ) -> bool:
  """Whether main.py should run argv supervised: training, not already supervised, and not
  switched off with MM_JAX_NO_SUPERVISOR=1."""
  return not (env.get(ENV_SUPERVISED) or env.get(ENV_OFF) == "1") and training(argv)


def dump_dir(argv: list[str]) -> str | None:
  """Where run() puts reports for main.py's argv: WORKDIR/logs for a local --workdir; None (a
  temporary folder) without one or for a gs:// workdir."""
  workdir = _flags(argv)["workdir"]
  if not workdir or "://" in workdir:
    return None
  return os.path.join(os.path.abspath(workdir), "logs")


def run(argv: list[str], *, dump_dir: str | None = None) -> int:
  """Runs [sys.executable, *argv] supervised and returns the exit code to use. Call it from the
  main thread: it handles SIGTERM and SIGINT until the child ends (restored on return)."""
  if dump_dir is None or "://" in dump_dir:  # a gs:// workdir is no place for os.makedirs
    import tempfile

    dump_dir = tempfile.gettempdir()
  sup = _Supervisor(argv, dump_dir)
  # Even where one was ignored (SIGINT in a shell's `cmd &`): main.py handles both regardless.
  previous = {signum: signal.signal(signum, sup.forward)
              for signum in (signal.SIGTERM, signal.SIGINT)}
  try:
    return sup.run()
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)


class _Supervisor:

  def __init__(self, argv: list[str], dump_dir: str):
    self.argv, self.dump_dir = argv, dump_dir
    self.proc: subprocess.Popen | None = None
    self.pending = None  # a signal that came while the child did not exist yet
    self.forwarded = None  # the last signal forwarded
    self.ring = collections.deque(maxlen=_RING)  # the child's last stderr lines
    self.diverted: list[bytes] = []  # the first lines after the fatal marker
    self.report_path: str | None = None  # set once diverting starts
    self.report = None  # its open file (None if it could not be written)
    self.held: list[bytes] | None = None  # lines held back after an omen
    self.hold_until = 0.0
    self.partial = {}  # fd -> the bytes after its last newline
    self.progress = {"phase": None, "step": None, "ckpt": None, "stall_s": 0}
    self.last_beat = time.monotonic()

  def forward(self, signum, frame) -> None:
    self.forwarded = signum
    if self.proc is None:
      self.pending = signum
    else:
      self._signal(signum)

  def _signal(self, signum) -> None:
    if self.proc.returncode is None:  # not reaped yet: the pid is still the child's
      try:
        os.kill(self.proc.pid, signum)
      except ProcessLookupError:
        pass

  def run(self) -> int:
    beat_r, beat_w = os.pipe()
    env = {**os.environ, ENV_SUPERVISED: "1", ENV_BEAT_FD: str(beat_w)}
    try:
      # stdin from /dev/null: a background process group that reads the terminal is stopped.
      self.proc = subprocess.Popen([sys.executable, *self.argv], env=env, pass_fds=(beat_w,),
                                   stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   process_group=0, preexec_fn=_die_with_parent())
    except BaseException:
      os.close(beat_r)
      raise
    finally:
      os.close(beat_w)
    if self.pending is not None:
      self._signal(self.pending)
    self.sel = selectors.DefaultSelector()
    for fd, handler in ((self.proc.stderr.fileno(), self._stderr), (beat_r, self._beats)):
      os.set_blocking(fd, False)
      self.sel.register(fd, selectors.EVENT_READ, handler)
    try:
      stalled = not self._wait()
      if stalled:
        self._divert(f"the watchdog: no progress for {self.progress['stall_s']:g} s")
        self._signal(signal.SIGUSR1)  # heartbeat.install_stack_dump: Python stacks to stderr
        end = time.monotonic() + 2
        while not self._exited() and time.monotonic() < end:
          self._pump(min(_POLL_S, end - time.monotonic()))
      # Whatever the child left in its process group (data workers) would hold the pipes and
      # the accelerator: the run is over, so are they.
      try:
        os.killpg(self.proc.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
      self.proc.wait()
      self._drain()
      return self._verdict(stalled)
    finally:
      self.sel.close()
      os.close(beat_r)
      self.proc.stderr.close()
      if self.report:
        self.report.close()

  def _wait(self) -> bool:
    """Passes stderr through until the child exits (True) or the watchdog expires (False)."""
    while not self._exited():
      deadline = self._deadline()
      self._pump(_POLL_S if deadline is None else
                 min(_POLL_S, max(0.0, deadline - time.monotonic())))
      deadline = self._deadline()
      if deadline is not None and time.monotonic() >= deadline:
        return False
    return True

  def _exited(self) -> bool:
    """Whether the child has ended, without reaping it (so its process group id stays ours).
    Not its pipes' EOF: processes it started may hold them open."""
    if not hasattr(os, "waitid"):  # macOS
      return self.proc.poll() is not None
    try:
      return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
      return True

  def _deadline(self) -> float | None:
    stall_s = self.progress["stall_s"]
    ok = isinstance(stall_s, (int, float)) and stall_s > 0
    return self.last_beat + stall_s if ok else None

  def _pump(self, timeout: float) -> None:
    if not self.sel.get_map():  # both pipes at EOF: the child is about to be gone
      time.sleep(min(timeout, 0.02))
      return
    for key, _ in self.sel.select(timeout):
      self._read(key)
    if self.held is not None and time.monotonic() > self.hold_until:
      self._release()

  def _release(self) -> None:
    """No fatal line after the omen: the held lines belong on the console after all."""
    held, self.held = self.held or [], None
    _write_console(b"".join(held))

  def _drain(self) -> None:
    for key in list(self.sel.get_map().values()):
      while self._read(key):
        pass
    self._stderr(self.proc.stderr.fileno(), b"")  # a last line without a newline

  def _read(self, key) -> bool:
    try:
      data = os.read(key.fd, 1 << 16)
    except BlockingIOError:
      return False
    if not data:
      self.sel.unregister(key.fd)
    key.data(key.fd, data)
    return bool(data)

  def _lines(self, fd: int, data: bytes) -> list[bytes]:
    """Complete lines; at EOF (data == b"") also the rest, as do 64 KiB without a newline."""
    *lines, rest = (self.partial.get(fd, b"") + data).split(b"\n")
    if rest and (not data or len(rest) > 1 << 16):
      lines, rest = [*lines, rest], b""
    self.partial[fd] = rest
    return lines

  def _stderr(self, fd: int, data: bytes) -> None:
    console = []
    for line in self._lines(fd, data):
      text = line.decode(errors="replace")
      if self.report_path is None and _FATAL.search(text):
        self._divert("a fatal error")
      elif self.report_path is None and self.held is None and _OMEN.search(text):
        self.held, self.hold_until = [], time.monotonic() + _HOLD_S
      if self.report_path is not None and len(self.diverted) < _RING:
        self.diverted.append(line)
      if self.report:
        self.report.write(line + b"\n")
      elif self.held is not None:
        self.held.append(line + b"\n")
      else:  # not diverting, or the report could not be written: keep the lines visible
        console.append(line + b"\n")
      self.ring.append(line)
    _write_console(b"".join(console))

  def _beats(self, fd: int, data: bytes) -> None:
    """Each line is a beat (progress) and a JSON object updating the fields it carries."""
    for line in self._lines(fd, data):
      self.last_beat = time.monotonic()
      try:
        fields = json.loads(line)
      except ValueError:
        continue
      if isinstance(fields, dict):
        self.progress.update((k, v) for k, v in fields.items() if k in self.progress)

  def _divert(self, why: str, *, more: bool = True) -> None:
    """From now on the child's stderr goes to the report file, after the lines before it
    (more=False: the child is gone, the report is those lines)."""
    if self.report_path is not None:
      return
    held, self.held = self.held or [], None
    shown = list(self.ring)[:len(self.ring) - len(held)]
    path = os.path.join(self.dump_dir, f"mm_jax-crash-{time.strftime('%Y%m%d-%H%M%S')}-"
                        f"{self.proc.pid}.txt")
    self.report_path = path
    header = (f"mm_jax supervisor report: {why}\n"
              f"command: {shlex.join([sys.executable, *self.argv])}\n"
              f"pid {self.proc.pid}, {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
              f"--- the child's last {len(shown)} lines of stderr (on the console) ---\n")
    hidden = b"--- from here on, not on the console ---\n" if more or held else b""
    try:
      os.makedirs(self.dump_dir, exist_ok=True)
      self.report = open(path, "wb")
      self.report.write(header.encode() + b"".join(line + b"\n" for line in shown) + hidden +
                        b"".join(held))
      self.report.flush()
    except OSError as e:
      self.report = None
      self.report_path = f"stderr above (could not write {path}: {e.strerror})"
      _write_console(b"".join(held))

  def _verdict(self, stalled: bool) -> int:
    if stalled:
      p = self.progress
      step = "before the first step" if p["step"] is None else f"after step {p['step']}"
      ckpt = "none" if p["ckpt"] is None else f"step {p['ckpt']}"
      then = "starts the run again" if p["ckpt"] is None else "resumes from it"
      _say(f"stalled: no progress for {p['stall_s']:g} s (config.train.stall_timeout_s) in "
           f"{p['phase'] or 'start-up'} {step}; newest intact checkpoint: {ckpt}; stacks in "
           f"{self.report_path}; exit {EXIT_LOST}: the same command {then}")
      return EXIT_LOST
    code = self.proc.returncode
    lines = [line.decode(errors="replace") for line in (*self.diverted, *self.ring)]
    at = next((i for i, line in enumerate(lines) if _JAX_FATAL in line),
              next((i for i, line in enumerate(lines) if _PEER.search(line)), None))
    # A peer's death races two ways in the child: jax's abort, or a collective that fails
    # first and ends the child with its own EXIT_LOST line (then in the report, after jax's
    # fatal line). Either way one line here, naming the process where jax did.
    peer = at is not None and (code == EXIT_LOST or (code < 0 and -code != self.forwarded))
    if not peer and (code >= 0 or -code == self.forwarded):  # no crash dump to keep back
      self._release()
    if code >= 0 and not peer:  # the child said why itself
      if self.report_path is not None:
        _say(f"report in {self.report_path}")
      return code
    signum = -code
    name = _signal_name(signum)
    if not peer and signum == self.forwarded:
      _say(f"stopped by {name} before training started: nothing to save, nothing lost; "
           f"exit {EXIT_PREEMPTED}")
      return EXIT_PREEMPTED
    if code < 0 or self.report_path is None:
      why = f"killed by {name}" if code < 0 else "a peer died"
      self._divert(why, more=False)  # the last lines, if no report yet
    if not peer:
      hint = (" (out of host memory? the kernel's OOM killer sends it; see dmesg)"
              if signum == signal.SIGKILL else "")
      _say(f"crashed: killed by {name}{hint}; report in {self.report_path}")
      return 128 + signum
    near = lines[at:at + 12]
    tasks = _tasks(near)
    who = (f"process{'es' if len(tasks) > 1 else ''} {', '.join(tasks)} stopped responding"
           if tasks else "another process or the coordinator stopped")
    _say(f"peer lost: {who} ({_reason(near)}); report in {self.report_path}; exit "
         f"{EXIT_LOST}: restart the job (it resumes from the newest checkpoint)")
    return EXIT_LOST


def _tasks(near: list[str]) -> list[str]:
  """The processes jax names: the lines after "The following tasks are unhealthy ...:", one
  task each (a number, or a /job:...task:N name in older jax); else any task names."""
  at = next((i for i, line in enumerate(near) if "tasks are unhealthy" in line), None)
  if at is None:
    return list(dict.fromkeys(t for line in near for t in _TASK.findall(line)))
  tasks = []
  for line in near[at + 1:]:
    task = _TASK.search(line) or _TASK_ID.fullmatch(line)
    if not task:
      break
    tasks.append(task.group(1))
  return list(dict.fromkeys(tasks))


def _reason(near: list[str]) -> str:
  """The informative part of jax's message: what follows "absl::Status:" (the sentence before
  it is the same every time), else the line itself without its glog prefix."""
  first = _GLOG_PREFIX.sub("", near[0]).strip()
  _, found, status = first.partition("absl::Status:")
  candidates = [status, *near[1:]] if found else [first]
  text = next((c.strip().rstrip(":") for c in candidates
               if c.strip() and not (_TASK.search(c) or _TASK_ID.fullmatch(c))), first)
  return text if len(text) <= 160 else text[:157] + "..."


def _die_with_parent():
  """A preexec_fn: the kernel SIGKILLs the child when this process dies, however it dies (a
  SIGKILL of the parent cannot be forwarded). Linux only; None elsewhere."""
  if not sys.platform.startswith("linux"):
    return None
  import ctypes

  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  parent = os.getpid()

  def preexec() -> None:
    prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl: no signal will come
      os._exit(1)

  return preexec


def _signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def _write_console(data: bytes) -> None:
  if not data:
    return
  try:  # a closed console (`| head`) must not end the run
    out = getattr(sys.stderr, "buffer", None)
    if out is None:
      sys.stderr.write(data.decode(errors="replace"))
    else:
      out.write(data)
      out.flush()
    sys.stderr.flush()
  except (OSError, ValueError):
    pass


def _say(message: str) -> None:
  try:
    print(message, file=sys.stderr, flush=True)
  except (OSError, ValueError):
    pass
