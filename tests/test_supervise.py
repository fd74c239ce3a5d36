"""mm_jax.supervise and mm_jax.heartbeat with small fake children (not main.py): exit codes,
what reaches the console and what goes to the report, signals, the watchdog.

The supervisor runs in its own subprocess (and process group) wherever signals are involved:
it installs handlers, and a test must be able to kill it without killing pytest.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mm_jax import heartbeat, supervise

REPO = pathlib.Path(__file__).resolve().parents[1]

# Every fake child: no core file when it aborts, and a way to say "handlers are in place".
_PRELUDE = """\
import os, resource, signal, sys, time
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def ready(text=""):
  with open({ready!r} + ".tmp", "w") as f:
    f.write(str(text))
  os.replace({ready!r} + ".tmp", {ready!r})
"""


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in (supervise.ENV_SUPERVISED, supervise.ENV_BEAT_FD, supervise.ENV_OFF)}
  env["PYTHONPATH"] = str(REPO)
  return env


def _start(tmp_path, body: str, *, patch: str = "") -> subprocess.Popen:
  """The supervisor, running a child script made of _PRELUDE and `body`."""
  script = tmp_path / "child.py"
  script.write_text(_PRELUDE.format(ready=str(tmp_path / "ready")) + textwrap.dedent(body))
  code = (f"import sys\nfrom mm_jax import supervise\n{textwrap.dedent(patch)}\n"
          f"sys.exit(supervise.run([{str(script)!r}], dump_dir={str(tmp_path / 'dumps')!r}))")
  return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, list[str]]:
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  return proc.returncode, out, err.splitlines()


def _supervise(tmp_path, body: str, **kw) -> tuple[int, str, list[str]]:
  return _finish(_start(tmp_path, body, **kw))


def _wait_ready(tmp_path, proc: subprocess.Popen, timeout: float = 30) -> str:
  path = tmp_path / "ready"
  deadline = time.monotonic() + timeout
  while not path.exists():
    if proc.poll() is not None:
      pytest.fail(f"the supervisor ended first: {_finish(proc)}")
    if time.monotonic() > deadline:
      os.killpg(proc.pid, signal.SIGKILL)
      pytest.fail("the child never got ready")
    time.sleep(0.02)
  return path.read_text()


def _report(line: str) -> str:
  path = re.search(r"(?:report|stacks) in (\S+?);?(?: |$)", line).group(1)
  assert pathlib.Path(path).name.startswith("mm_jax-crash-"), line
  return pathlib.Path(path).read_text()


def _alive(pid: int) -> bool:
  """Running, not a zombie (an orphan's zombie may wait a while for a reaper)."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except FileNotFoundError:
    return False
  return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def test_exit_code_and_output_pass_through(tmp_path):
  rc, out, err = _supervise(tmp_path, f"""
    print("to stdout", os.environ[{supervise.ENV_SUPERVISED!r}], os.getpgid(0) == os.getpid())
    sys.stderr.write("line one\\nline two\\nno newline at the end")
    sys.exit(3)
  """)
  assert rc == 3
  assert out == "to stdout 1 True\n"  # supervised, in its own process group
  assert err == ["line one", "line two", "no newline at the end"]
  assert not (tmp_path / "dumps").exists()  # nothing fatal: no report


_JAX_ABORT = """
  print("step 3: loss 2.5", file=sys.stderr, flush=True)
  sys.stderr.write(
      "{omen}F0926 17:26:32.075587  157988 client.h:77] Terminating process because the JAX "
      "distributed service detected fatal errors. This most likely indicates that another task "
      "died; see the other task logs for more details. Disable Python buffering, i.e. `python "
      "-u`, to be sure to see all the previous output. absl::Status: {status}\\n{more}"
      "RPC: /tensorflow.CoordinationService/PollForError\\n*** Check failure stack trace: ***\\n")
  for i in range(70):
    sys.stderr.write(f"    @     0x7f00000{{i:05d}}  dump_frame_{{i}}\\n")
  sys.stderr.flush()
  os.abort()
"""
_UNHEALTHY = "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats)"
# What jax 0.10 logs on process 0 (the coordination service's) just before its fatal line.
_OMENS = ("E1207 18:06:24.423713   10324 coordination_service.cc:1549] [157895616] Use error "
          f"polling to propagate the following error to all tasks: {_UNHEALTHY}:\\n1\\n3\\nThe "
          "tasks have crashed.\\nE1207 18:06:24.424342   10335 coordination_service_agent.cc:289]"
          " Polled an error from coordination service (this can be an error from this or another "
          "task).\\n")


@pytest.mark.parametrize("omen, status, more, who, reason", [
    ("", f"{_UNHEALTHY}:", "/job:jax_worker/replica:0/task:1\\nThe tasks have crashed.\\n",
     "process 1 stopped responding", _UNHEALTHY),  # jax < 0.9 names tasks so
    (_OMENS, f"{_UNHEALTHY}:", "1\\n3\\nThe tasks have crashed.\\n",
     "processes 1, 3 stopped responding", _UNHEALTHY),
    ("", "UNAVAILABLE: Failed to send RPC to coordination service.", "",
     "another process or the coordinator stopped",
     "UNAVAILABLE: Failed to send RPC to coordination service."),
])
def test_peer_lost_is_one_line_and_exit_43(tmp_path, omen, status, more, who, reason):
  rc, _, err = _supervise(tmp_path, _JAX_ABORT.format(omen=omen, status=status, more=more))
  assert rc == supervise.EXIT_LOST == 43
  assert err[0] == "step 3: loss 2.5"  # before the marker: on the console as it came
  assert len(err) == 2, err  # then one line, no dump
  assert err[1].startswith(f"peer lost: {who} ({reason}); report in "), err[1]
  assert err[1].endswith("; exit 43: restart the job (it resumes from the newest checkpoint)")
  report = _report(err[1])
  assert "step 3: loss 2.5" in report  # the context before the marker
  assert "Terminating process because" in report and omen.split("\\n")[0] in report
  assert all(f"dump_frame_{i}\n" in report for i in range(70))


def test_a_real_jax_abort_is_one_line(tmp_path):
  """Two real jax.distributed processes (tests/distributed_worker.py, all-gathers in a loop),
  process 0 supervised: SIGKILL process 1, and process 0's jax aborts after the 5 s heartbeat
  timeout. What this jax really prints (its task names have changed before) must still make
  one line naming process 1."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  args = [str(REPO / "tests" / "distributed_worker.py"), "loop", "60", "5"]
  code = (f"import sys\nfrom mm_jax import supervise\n"
          f"sys.exit(supervise.run({args!r}, dump_dir={str(tmp_path)!r}))")
  procs = []
  try:
    for i, cmd in enumerate(([sys.executable, "-c", code], [sys.executable, *args])):
      env = {k: v for k, v in _env().items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu")
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, process_group=0))
    for proc in procs:  # gloo prints lines of its own first
      deadline = time.monotonic() + 120
      while (line := _readline(proc.stdout, deadline)) != "READY\n":
        assert line, f"ended before READY: {_finish(proc)}"
    procs[1].kill()
    rc, _, err = _finish(procs[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
  assert rc == 43, err
  assert err[-1].startswith(f"peer lost: process 1 stopped responding ({_UNHEALTHY}); "), err
  assert not [line for line in err[:-1] if "Terminating" in line or "@ " in line], err
  assert "Terminating process because the JAX distributed service" in _report(err[-1])


def _readline(pipe, deadline: float) -> str:
  if not select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
    pytest.fail("no line in time")
  return pipe.readline()


def test_lines_held_after_an_omen_reach_the_console_without_a_crash(tmp_path):
  rc, _, err = _supervise(tmp_path, """
    omen = "E0101 00:00:00.000000 1 a.cc:1] Polled an error from coordination service"
    print(omen, "\\nand then no fatal line", file=sys.stderr, flush=True)
    time.sleep(0.5)
  """, patch="supervise._HOLD_S = 0.1")
  assert rc == 0
  assert err == ["E0101 00:00:00.000000 1 a.cc:1] Polled an error from coordination service ",
                 "and then no fatal line"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_reaches_the_child_once(tmp_path, signum):
  got = tmp_path / "got"
  proc = _start(tmp_path, f"""
    def on_stop(signum, frame):
      with open({str(got)!r}, "a") as f:
        f.write(f"{{signum}}\\n")
      time.sleep(0.5)  # a second delivery would land here
      sys.exit(42)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    ready()
    time.sleep(120)
  """)
  _wait_ready(tmp_path, proc)
  os.killpg(proc.pid, signum)  # the supervisor's whole process group, as a terminal's Ctrl-C
  rc, _, err = _finish(proc)
  assert rc == 42 and err == []  # the child's own code and message (none here)
  assert got.read_text().split() == [str(int(signum))]


def test_stop_signal_before_the_child_exists(tmp_path):
  """A SIGTERM while the child is being started is sent as soon as it exists; the child, with
  no handler yet, dies of it: nothing was running, so nothing is lost."""
  rc, _, err = _supervise(tmp_path, "time.sleep(120)\n", patch="""
    import os, signal
    popen = supervise.subprocess.Popen
    def late_popen(*args, **kwargs):
      os.kill(os.getpid(), signal.SIGTERM)  # handled here, before the child exists
      return popen(*args, **kwargs)
    supervise.subprocess.Popen = late_popen
  """)
  assert rc == 42
  assert err == ["stopped by SIGTERM before training started: nothing to save, nothing lost; "
                 "exit 42"]


def test_watchdog_ends_a_stalled_child_with_its_stacks(tmp_path):
  start = time.monotonic()
  rc, _, err = _supervise(tmp_path, """
    from mm_jax import heartbeat
    heartbeat.install_stack_dump()
    heartbeat.beat("train", step=7, ckpt=5, stall_s=2)
    def stuck_here():
      time.sleep(120)
    stuck_here()
  """)
  assert rc == 43
  assert time.monotonic() - start < 30
  assert len(err) == 1, err
  assert err[0].startswith("stalled: no progress for 2 s (config.train.stall_timeout_s) in train "
                           "after step 7; newest intact checkpoint: step 5; stacks in "), err[0]
  assert err[0].endswith("; exit 43: the same command resumes from it")
  assert "stuck_here" in _report(err[0])  # faulthandler's dump, on SIGUSR1


def test_sigkill_of_the_supervisor_takes_the_child_along(tmp_path):
  proc = _start(tmp_path, "ready(os.getpid())\ntime.sleep(120)\n")
  child = int(_wait_ready(tmp_path, proc))
  assert _alive(child)
  proc.kill()
  proc.wait(timeout=30)  # not communicate(): a surviving child would hold its pipes open
  deadline = time.monotonic() + 10
  while _alive(child) and time.monotonic() < deadline:
    time.sleep(0.05)
  survived = _alive(child)
  if survived:
    os.kill(child, signal.SIGKILL)
  proc.stdout.close()
  proc.stderr.close()
  assert not survived


@pytest.mark.parametrize("crash, code, line, in_report", [
    ("faulthandler.enable(); ctypes.string_at(0)", 139, "crashed: killed by SIGSEGV; report in ",
     "Fatal Python error: Segmentation fault"),
    ("os.kill(os.getpid(), signal.SIGKILL)", 137,
     "crashed: killed by SIGKILL (out of host memory? the kernel's OOM killer sends it; see "
     "dmesg); report in ", "before the crash"),
])
def test_crash_by_a_signal_is_one_line(tmp_path, crash, code, line, in_report):
  rc, _, err = _supervise(tmp_path, f"""
    import ctypes, faulthandler
    print("before the crash", file=sys.stderr, flush=True)
    {crash}
  """)
  assert rc == code
  assert err[0] == "before the crash" and len(err) == 2, err
  assert err[1].startswith(line), err[1]
  assert in_report in _report(err[1])


def test_a_fatal_line_then_an_exit_code_names_the_report(tmp_path):
  rc, _, err = _supervise(tmp_path, """
    print("F0101 00:00:00.000000 1 x.cc:1] Check failed: boom", file=sys.stderr)
    print("a line of the dump", file=sys.stderr)
    sys.exit(1)
  """)
  assert rc == 1
  assert len(err) == 1 and err[0].startswith("report in "), err
  assert "Check failed: boom\na line of the dump\n" in _report(err[0])


@pytest.mark.parametrize("args, env, expected", [
    ([], {}, True),
    (["--config=configs/llava.py:tiny", "--workdir", "/tmp/w"], {}, True),
    (["--mode=train"], {}, True),
    (["--mode", "train", "--nodry_run"], {}, True),
    (["--dry_run=false"], {}, True),
    (["--target="], {}, True),
    (["--noprint_config"], {}, True),
    (["--mode=eval"], {}, False),
    (["--mode", "generate"], {}, False),
    (["--mode=eval", "--mode=train"], {}, True),  # absl: the last one wins
    (["--dry_run"], {}, False),
    (["--dry_run=true"], {}, False),
    (["--dry_run=1"], {}, False),
    (["--dry_run", "--nodry_run"], {}, True),
    (["--target=v5p-16"], {}, False),
    (["--target", "h100x8"], {}, False),
    (["--print_config"], {}, False),
    (["--help"], {}, False),
    (["--helpfull"], {}, False),
    (["--helpshort"], {}, False),
    (["-?"], {}, False),
    (["--", "--dry_run"], {}, True),  # not a flag any more
    ([], {"MM_JAX_SUPERVISED": "1"}, False),
    ([], {"MM_JAX_NO_SUPERVISOR": "1"}, False),
    ([], {"MM_JAX_NO_SUPERVISOR": "0"}, True),
])
def test_wanted(args, env, expected):
  assert supervise.wanted(["main.py", *args], env) is expected
  if not env:
    assert supervise.training(["main.py", *args]) is expected


def test_dump_dir():
  assert supervise.dump_dir(["main.py", "--workdir=/runs/a"]) == "/runs/a/logs"
  assert supervise.dump_dir(["main.py", "--workdir", "rel"]) == os.path.abspath("rel/logs")
  assert supervise.dump_dir(["main.py", "--workdir=gs://bucket/run"]) is None
  assert supervise.dump_dir(["main.py"]) is None


def test_import_is_stdlib_only():
  code = ("import sys\nbefore = set(sys.modules)\nimport mm_jax.supervise, mm_jax.heartbeat\n"
          "print(' '.join(sorted(set(sys.modules) - before)))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), check=True,
                       capture_output=True, text=True).stdout.split()
  assert "mm_jax.supervise" in out
  others = [m for m in out if m.partition(".")[0] not in sys.stdlib_module_names | {"mm_jax"}]
  assert others == []
  assert not {"jax", "absl", "numpy", "ctypes"} & set(out)


@pytest.fixture
def beat_pipe(monkeypatch):
  """A pipe posing as the supervisor's: (read end, write end)."""
  r, w = os.pipe()
  monkeypatch.setenv(supervise.ENV_SUPERVISED, "1")
  monkeypatch.setenv(supervise.ENV_BEAT_FD, str(w))
  monkeypatch.setattr(heartbeat, "_fd", None)
  yield r, w
  for fd in (r, w):
    try:
      os.close(fd)
    except OSError:
      pass


def test_beat_sends_only_the_fields_given(beat_pipe):
  r, _ = beat_pipe
  heartbeat.beat("train", step=3, ckpt=None, stall_s=5)
  heartbeat.beat(step=4)
  lines = os.read(r, 4096).decode().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"phase": "train", "step": 3, "stall_s": 5.0, "ckpt": None}, {"step": 4}]


def test_beat_never_blocks_or_raises(beat_pipe):
  r, _ = beat_pipe
  for step in range(20_000):  # far more than a pipe holds: the rest are dropped
    heartbeat.beat(step=step)
  os.close(r)  # the supervisor is gone
  heartbeat.beat(step=0)
  assert heartbeat._fd == -1


def test_beat_is_a_no_op_unsupervised(monkeypatch, tmp_path):
  monkeypatch.delenv(supervise.ENV_SUPERVISED, raising=False)
  monkeypatch.delenv(supervise.ENV_BEAT_FD, raising=False)
  monkeypatch.setattr(heartbeat, "_fd", None)
  heartbeat.beat("train", step=1)
  assert not heartbeat.supervised() and heartbeat._fd == -1
  with open(tmp_path / "f", "w") as f:  # an inherited number naming a file, not the pipe
    monkeypatch.setenv(supervise.ENV_BEAT_FD, str(f.fileno()))
    monkeypatch.setattr(heartbeat, "_fd", None)
    heartbeat.beat("train", step=1)
  assert (tmp_path / "f").read_text() == ""
