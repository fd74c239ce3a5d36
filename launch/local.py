"""Run N processes of main.py on this machine, each with the env a GPU JobSet pod gets.

    python -m launch.local --processes 2 [--devices_per_process 2] [--restarts R] -- \
        --config=... --workdir=DIR

The env comes from launch/gke.py's `env_for()` (the same function the manifests are built
from), with the coordinator moved to 127.0.0.1:<free port>, so a multi-process run here tests
the start-up a cluster does. `--devices_per_process K` gives each process K fake CPU devices.

Exit codes keep mm_jax/faults.py's contract: the first failure's code if a process failed,
else 43 if one was lost (or disrupted, below), else 42 if one was preempted, else 0. A process
that fails (not 0, 42 or 43) gets the others killed at once: they would only wait for it in a
collective. After a 43 or a disruption the others get up to 30 s to see the loss and exit 43
themselves (main.py's supervisor does), then are killed. SIGTERM/SIGINT to the launcher is
passed on as SIGTERM, so every process saves and exits 42, as in a pod eviction; no restart
follows it.

`--restarts R` (default 0: none) restarts as the JobSet's failure policy does (launch/gke.py):
an attempt that ends 42 or 43, or in which a process died of SIGKILL or SIGTERM that the
launcher did not send (a node loss or a disruption; the job's code is then 43), starts all N
processes again, with a fresh coordinator port and the same flags, up to R times; main.py
resumes from the newest checkpoint. Any other outcome ends the job. The launcher prints a line
per restart, and `[launch.local] process i: pid P (attempt a)` as each attempt starts
(attempts count from 0, as the JobSet's restart attempt does), so that `kill -9 P` can
stand in for the loss of process i's node.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from launch import gke
from mm_jax.faults import EXIT_LOST, EXIT_OK, EXIT_PREEMPTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESTARTABLE = (EXIT_PREEMPTED, EXIT_LOST)
_DONE = (EXIT_OK, *RESTARTABLE)
# How a node loss or an eviction past its grace period ends a pod's process, seen from here.
_DISRUPTIONS = (signal.SIGKILL, signal.SIGTERM)
# Long enough for a survivor to see a dead peer (a failed collective at once, else
# main.py's --heartbeat_timeout_s; tests set 20) and its supervisor to say so and exit 43.
GRACE_S = 30.0
_WHY = {EXIT_PREEMPTED: "preempted", EXIT_LOST: "peer lost or stalled"}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_envs(processes: int, devices_per_process: int | None = None,
                 base: dict | None = None) -> list[dict[str, str]]:
  """One env per process: `base` (default os.environ) plus a GPU pod's distributed env."""
  spec = gke.JobSpec(name="local", image="local", workdir="local", accelerator="a3-highgpu-8g",
                     nodes=processes, args=("--config=local",))
  base = dict(os.environ if base is None else base)
  port = str(free_port())
  envs = []
  for i in range(processes):
    env = {**base, **gke.env_for(spec, i)}
    env.update(JAX_COORDINATOR_ADDRESS="127.0.0.1", JAX_COORDINATOR_PORT=port)
    if devices_per_process:
      env.pop("XLA_FLAGS", None)  # an inherited device count would override ours
      env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process))
    envs.append(env)
  return envs


class _Out:
  """Whole lines to `out`, flushed, one writer at a time: the processes' pipe threads and the
  launcher's own lines share it, and a test reads the pids from it while the job runs."""

  def __init__(self, out):
    self.out, self.lock = out, threading.Lock()

  def line(self, text: str) -> None:
    with self.lock:
      self.out.write(text if text.endswith("\n") else text + "\n")
      self.out.flush()


def _pipe(proc: subprocess.Popen, prefix: str, out: _Out) -> None:
  for line in proc.stdout:
    out.line(f"{prefix}{line}")


def exit_code(codes: list[int | None]) -> int:
  """The contract's code for the job, from codes in the order processes ended (a disruption
  given as 43, the processes the launcher killed left out)."""
  codes = [128 - c if c is not None and c < 0 else c for c in codes]  # -N: killed by signal N
  failed = [c for c in codes if c not in _DONE]
  if failed:
    return failed[0]
  # 43 over 42: a lost process saved nothing, so the job resumes from the newest checkpoint.
  return next((c for c in (EXIT_LOST, EXIT_PREEMPTED) if c in codes), EXIT_OK)


def _ending(i: int, returncode: int, sent: int | None) -> tuple[int | None, str]:
  """(code for exit_code, None if the launcher's own kill; why, for the restart line)."""
  if returncode >= 0:
    what = f": {_WHY[returncode]}" if returncode in _WHY else ""
    return returncode, f"process {i} exited {returncode}{what}"
  signum = -returncode
  try:
    name = signal.Signals(signum).name
  except ValueError:  # a real-time signal has no name
    name = f"signal {signum}"
  if sent == signal.SIGKILL:
    return None, ""
  if sent is None and signum in _DISRUPTIONS:
    return EXIT_LOST, f"process {i} killed by {name}, not by the launcher: a node loss"
  return returncode, f"process {i} killed by {name}"


class _Job:
  """Whether the launcher was told to stop (SIGTERM/SIGINT)."""

  def __init__(self):
    self.stopping = False

  def stop(self, signum, frame) -> None:
    # Only a flag: the attempt's loop sends the SIGTERMs, so a process started after the
    # signal arrived gets one too.
    self.stopping = True


def _attempt(job: _Job, attempt: int, processes: int, main_flags: list[str],
             devices_per_process: int | None, out: _Out, program: tuple[str, ...],
             grace_s: float) -> tuple[int, str]:
  """Runs one attempt of all processes: (the job's code, why it ended as it did)."""
  procs, pipes = [], []
  sent: dict[int, int] = {}  # process -> the signal the launcher sent it
  ended: list[tuple[int | None, str]] = []  # (code, why) in the order processes ended
  grace_until = None  # after a loss: when the survivors that did not exit get killed

  def kill(running):
    for j in running:
      procs[j].kill()
      sent[j] = signal.SIGKILL

  try:
    for i, env in enumerate(process_envs(processes, devices_per_process)):
      p = subprocess.Popen([*program, *main_flags], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      procs.append(p)
      out.line(f"[launch.local] process {i}: pid {p.pid} (attempt {attempt})")
      pipes.append(threading.Thread(target=_pipe, args=(p, f"[{i}] ", out), daemon=True))
      pipes[-1].start()
    running = set(range(processes))
    while running:
      if job.stopping:
        for j in sorted(running - sent.keys()):
          procs[j].send_signal(signal.SIGTERM)
          sent[j] = signal.SIGTERM
      for i in sorted(running):
        returncode = procs[i].poll()
        if returncode is None:
          continue
        running.discard(i)
        code, why = _ending(i, returncode, sent.get(i))
        if code is None:
          continue
        ended.append((code, why))
        if code not in _DONE:
          kill(running)
        elif code == EXIT_LOST and grace_until is None:
          grace_until = time.time() + grace_s
      if grace_until is not None and time.time() > grace_until:
        kill(running)
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for t in pipes:  # the attempt's output before the launcher's line about it
      t.join(timeout=5)
  code = exit_code([c for c, _ in ended])
  return code, next((why for c, why in ended if c == code), "")


def run(processes: int, main_flags: list[str], devices_per_process: int | None = None,
        out=None, program: tuple[str, ...] = (sys.executable, "main.py"), restarts: int = 0,
        grace_s: float = GRACE_S) -> int:
  """Runs `program` + `main_flags` in each process (tests swap in a stand-in program), again
  after a restartable outcome, up to `restarts` times; the last attempt's code."""
  out = _Out(out or sys.stdout)
  job = _Job()
  old = {s: signal.signal(s, job.stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    attempt = 0
    while True:
      code, why = _attempt(job, attempt, processes, main_flags, devices_per_process, out,
                           program, grace_s)
      if code not in RESTARTABLE or job.stopping:
        return code
      if attempt == restarts:
        if restarts:
          out.line(f"[launch.local] attempt {attempt} ended with {code} ({why}): no restarts "
                   f"left (--restarts={restarts})")
        return code
      out.line(f"[launch.local] attempt {attempt} ended with {code} ({why}): restarting "
               f"all {processes} processes (restart {attempt + 1} of {restarts})")
      attempt += 1
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  ours, main_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
    else (argv, [])
  p = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n")[0])
  p.add_argument("--processes", type=int, required=True)
  p.add_argument("--devices_per_process", type=int, default=None,
                 help="fake CPU devices per process (JAX_PLATFORMS=cpu)")
  p.add_argument("--restarts", type=int, default=0,
                 help="restart all processes after a 42, a 43 or a node loss, up to this many "
                      "times (as the JobSet does)")
  a = p.parse_args(ours)
  if a.processes < 1:
    p.error("--processes must be at least 1")
  if a.restarts < 0:
    p.error("--restarts must be at least 0")
  return run(a.processes, main_flags, a.devices_per_process, restarts=a.restarts)


if __name__ == "__main__":
  sys.exit(main())
