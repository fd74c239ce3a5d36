"""Run N processes of main.py on this machine, each with the env a GPU JobSet pod gets.

    python -m launch.local --processes 2 [--devices_per_process 2] -- --config=... --workdir=DIR

The env comes from launch/gke.py's `env_for()` (the same function the manifests are built
from), with the coordinator moved to 127.0.0.1:<free port>, so a multi-process run here tests
the start-up a cluster does. `--devices_per_process K` gives each process K fake CPU devices.

Exit codes keep mm_jax/faults.py's contract: 42 if a process was preempted and none failed,
else the first failure's code, else 0. A process that fails (not 0 or 42) gets the others
killed: they would only wait for it in a collective. SIGTERM/SIGINT to the launcher is passed
on as SIGTERM, so every process saves and exits 42, as in a pod eviction.
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
from mm_jax.faults import EXIT_OK, EXIT_PREEMPTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DONE = (EXIT_OK, EXIT_PREEMPTED)


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


def _pipe(proc: subprocess.Popen, prefix: str, out) -> None:
  for line in proc.stdout:
    out.write(f"{prefix}{line}")
    out.flush()


def exit_code(codes: list[int | None]) -> int:
  """The contract's code for the job, from codes in the order processes ended."""
  codes = [128 - c if c is not None and c < 0 else c for c in codes]  # -N: killed by signal N
  failed = [c for c in codes if c not in _DONE]
  if failed:
    return failed[0]
  return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else EXIT_OK


def run(processes: int, main_flags: list[str], devices_per_process: int | None = None,
        out=None, program: tuple[str, ...] = (sys.executable, "main.py")) -> int:
  """Runs `program` + `main_flags` in each process (tests swap in a stand-in program)."""
  out = out or sys.stdout
  procs, pipes = [], []
  for i, env in enumerate(process_envs(processes, devices_per_process)):
    p = subprocess.Popen([*program, *main_flags], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(p)
    pipes.append(threading.Thread(target=_pipe, args=(p, f"[{i}] ", out), daemon=True))
    pipes[-1].start()

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  ended: list[int] = []  # codes in the order processes ended
  try:
    running = set(range(processes))
    while running:
      for i in sorted(running):
        code = procs[i].poll()
        if code is None:
          continue
        running.discard(i)
        ended.append(code)
        if code not in _DONE:
          for j in running:
            procs[j].kill()
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for t in pipes:
      t.join(timeout=5)
    for s, handler in old.items():
      signal.signal(s, handler)
  return exit_code(ended)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  ours, main_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
    else (argv, [])
  p = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n")[0])
  p.add_argument("--processes", type=int, required=True)
  p.add_argument("--devices_per_process", type=int, default=None,
                 help="fake CPU devices per process (JAX_PLATFORMS=cpu)")
  a = p.parse_args(ours)
  if a.processes < 1:
    p.error("--processes must be at least 1")
  return run(a.processes, main_flags, a.devices_per_process)


if __name__ == "__main__":
  sys.exit(main())
