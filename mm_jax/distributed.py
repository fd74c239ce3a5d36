"""Multi-process JAX start-up: one `initialize()` for TPU pods, Kubernetes, Slurm and one host.

`detect()` reads where this process sits in the job; `initialize()` starts
`jax.distributed` from that, with a start-up timeout and a heartbeat, and turns any failure
into a one-line `DistributedError` naming the coordinator.

Where the cluster comes from, first match wins:

1. Explicit arguments to `detect()` (`coordinator`, `num_processes`, `process_id`; all three
   or none) -> source "flags".
2. `JAX_COORDINATOR_ADDRESS` -> source "env" (set it yourself, or let xpk or a JobSet do it):
   - `JAX_COORDINATOR_ADDRESS`: `host` or `host:port` (IPv6 as `[addr]:port`).
   - `JAX_COORDINATOR_PORT`: the port when the address has none (default 8476; xpk sets
     the address without a port and this variable with it).
   - `JAX_NUM_PROCESSES`, else `NNODES`: the process count.
   - `JAX_PROCESS_ID`, else `NODE_RANK`, else `JOB_COMPLETION_INDEX` (what an Indexed Job
     sets in each pod): this process's index.
3. Slurm, when `SLURM_JOB_ID` is set and `SLURM_NTASKS` > 1 -> source "slurm":
   - `SLURM_NTASKS`: the process count; `SLURM_PROCID`: this process's index.
   - `SLURM_STEP_NODELIST`, else `SLURM_JOB_NODELIST`: the coordinator is its first host
     (compressed hostlists such as `node[007-010,012],gpu-a1` are understood).
   - `JAX_COORDINATOR_PORT`, else 10000 + `SLURM_JOB_ID` % 10000 (so concurrent jobs differ).
   jax then gives each process the one GPU numbered `SLURM_LOCALID` (its Slurm default: one
   process per GPU, `srun --ntasks-per-node=<GPUs>`); `JAX_LOCAL_DEVICE_IDS=0,1,...` overrides.
4. A multi-host Cloud TPU -> source "tpu", coordinator None: jax detects everything itself.
   Multi-host means: `TPU_PROCESS_ADDRESSES` or `TPU_WORKER_HOSTNAMES` (GKE) lists more than
   one host (times `MEGASCALE_NUM_SLICES`), or, without those lists, `MEGASCALE_NUM_SLICES`,
   `MEGASCALE_COORDINATOR_ADDRESS` or `TPU_WORKER_ID` is set, or, reading the real
   environment, jax found TPU chips and libtpu (a Cloud TPU VM) and `TPU_SKIP_MDS_QUERY` is
   unset: a GCE TPU VM keeps its worker list in the metadata server, not in the environment,
   so jax reads it there (a single-host VM then forms a group of one).
   A single-host GKE TPU (one name in `TPU_WORKER_HOSTNAMES`) is "single".
5. Otherwise -> source "single": one process, `initialize()` does nothing.

jax itself also reads `JAX_LOCAL_DEVICE_IDS` (which local devices this process drives) and
`JAX_COORDINATOR_BIND_ADDRESS` (what process 0 listens on; default all interfaces).

Failure behaviour, measured with 2 real processes on CPU (gloo collectives, jax 0.10.2; the
tests in tests/test_distributed.py check it):
- Start-up: a process whose peers (or coordinator) never come raises DistributedError after
  `timeout_s`, one line: "distributed start: process 1 of 2 could not join the coordinator
  10.0.0.1:8476 (env: JAX_COORDINATOR_ADDRESS) within 300 s: not every process joined: ...".
  The process then exits with status 1 (see `_connect`: jax itself would abort it). A
  coordinator port already taken on process 0's host fails at once (jax would segfault).
- A peer that dies after start-up (SIGKILL, or frozen by SIGSTOP) ends every survivor, also
  one blocked inside a gloo collective: jax's coordination service terminates it with
  SIGABRT (status -6, 134 in a shell; stderr: "Terminating process because the JAX
  distributed service detected fatal errors"). When process 0 (the coordinator's host) is
  killed, the others end within 0.1 s; when another process dies or any process freezes, the
  rest end after `heartbeat_timeout_s` (5.0-5.1 s for 5, 9.3-10.1 s for 10, 99 s for the
  default 100). A survivor whose collective fails first (gloo: "Connection closed by peer")
  waits for the same heartbeat in jax's shutdown barrier at exit, then aborts the same way.
- Not detected: a peer that is alive but never reaches the next collective (a deadlock, a
  stuck input pipeline) keeps its heartbeats going, and the others wait in the collective
  (more than 4 minutes observed; jax exposes no gloo timeout). SIGTERM does not end them
  either: jax's preemption service catches it (the training loop saves and exits on it at its
  next step); SIGKILL, which Kubernetes and Slurm send after their grace period, does.
"""

import atexit
import dataclasses
import errno
import os
import re
import socket
import sys
import threading
import zlib
from collections.abc import Mapping

import jax

DEFAULT_PORT = 8476  # xpk's default for JAX_COORDINATOR_PORT
_SLURM_PORTS = (10000, 10000)  # base, span: ports 10000..19999
_ERROR_CHARS = 200  # how much of jax's error the one-line message keeps
_JAX_GRACE_S = 60  # jax's own start-up timeout is this much longer than ours (see _connect)


class DistributedError(RuntimeError):
  """A cluster that cannot be detected or started; the message is one user-facing line."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process sits in a multi-process job.

  On TPU `coordinator` is None and, when the environment does not list the workers (GCE),
  `num_processes` is 0 until `initialize()` returns jax's values.
  """
  coordinator: str | None  # "host:port"; None on TPU (jax detects it) or for one process
  num_processes: int
  process_id: int
  source: str  # "flags", "env", "slurm", "tpu" or "single"
  origin: str = ""  # the variables it was read from, for error messages


def detect(env: Mapping[str, str] | None = None, *, coordinator: str | None = None,
           num_processes: int | None = None, process_id: int | None = None,
           tpu_vm: bool | None = None) -> Cluster:
  """The cluster of this process: explicit args, then env, Slurm, TPU, else one process.

  `env` defaults to os.environ. `tpu_vm` says whether this is a Cloud TPU VM; None asks jax
  when `env` is the real environment and means False for a given mapping (tests).
  """
  flags = (coordinator, num_processes, process_id)
  if any(v is not None for v in flags):
    return _from_flags(*flags)
  if tpu_vm is None:
    tpu_vm = env is None and _jax_sees_tpu_vm()
  env = os.environ if env is None else env
  for reader in (_from_env, _from_slurm):
    if (cluster := reader(env)) is not None:
      return cluster
  return _from_tpu(env, tpu_vm) or Cluster(None, 1, 0, "single")


def initialize(cluster: Cluster, *, timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> Cluster:
  """Starts jax.distributed for `cluster` (nothing for one process); returns the cluster.

  `timeout_s` bounds the start-up: every process must have joined the coordinator by then.
  `heartbeat_timeout_s` bounds how long the survivors run on after a peer dies.
  Raises DistributedError (one line, naming the coordinator) when the start fails; after a
  start-up timeout the process can only exit (see `_connect`), and it exits with status 1.
  """
  if cluster.source == "single" or cluster.num_processes == 1:
    return cluster
  kwargs = _jax_kwargs(cluster, heartbeat_timeout_s)
  if cluster.coordinator is not None and cluster.process_id == 0:
    _check_port_free(cluster, timeout_s)
  if (error := _connect(kwargs, timeout_s)) is not None:
    raise DistributedError(_start_failure(cluster, timeout_s, error)) from error
  return _as_started(cluster)


def first_host(nodelist: str) -> str:
  """The first host of a Slurm hostlist: "node[007-010,012],gpu-a1" -> "node007".

  Keeps zero padding as written and handles several bracket groups ("a[1-2]-b[3-4]" -> "a1-b3").
  """
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):
    depth += {"[": 1, "]": -1}.get(ch, 0)
    if depth < 0 or depth > 1:
      break
    if ch == "," and depth == 0:
      end = i
      break
  item = nodelist[:end].strip()
  if depth != 0 or not item or not re.fullmatch(r"[^\[\]]*(\[[^\[\]]+\][^\[\]]*)*", item):
    raise ValueError(f"not a Slurm hostlist: {nodelist!r}")
  return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0].strip(), item)


def _from_flags(coordinator, num_processes, process_id) -> Cluster:
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  if missing := [k for k, v in given.items() if v is None]:
    raise DistributedError(f"distributed flags: {', '.join(given)} go together; missing: "
                           f"{', '.join(missing)}")
  host, port = _split_address(str(coordinator), None, "the coordinator flag")
  count, index = (_parse_int(k, str(given[k]), str(given[k]))
                  for k in ("num_processes", "process_id"))
  return Cluster(f"{host}:{port}", count, index, "flags", "flags")


def _from_env(env: Mapping[str, str]) -> Cluster | None:
  address = env.get("JAX_COORDINATOR_ADDRESS", "").strip()
  if not address:
    return None
  host, port = _split_address(address, env, "JAX_COORDINATOR_ADDRESS")
  count = _first_int(env, "JAX_NUM_PROCESSES", "NNODES")
  index = _first_int(env, "JAX_PROCESS_ID", "NODE_RANK", "JOB_COMPLETION_INDEX")
  missing = [names for names, v in (
      ("JAX_NUM_PROCESSES (or NNODES)", count),
      ("JAX_PROCESS_ID (or NODE_RANK, or JOB_COMPLETION_INDEX)", index)) if v is None]
  if missing:
    raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address} is set, so set "
                           f"{' and '.join(missing)} too")
  return Cluster(f"{host}:{port}", count, index, "env", "env: JAX_COORDINATOR_ADDRESS")


def _from_slurm(env: Mapping[str, str]) -> Cluster | None:
  if not env.get("SLURM_JOB_ID") or (_first_int(env, "SLURM_NTASKS") or 1) <= 1:
    return None
  index = _first_int(env, "SLURM_PROCID")
  var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if env.get(v)), None)
  if index is None or var is None:
    what = "SLURM_PROCID" if index is None else "SLURM_STEP_NODELIST or SLURM_JOB_NODELIST"
    raise DistributedError(f"Slurm job with SLURM_NTASKS={env['SLURM_NTASKS']} but {what} "
                           "is unset: start the processes with srun")
  try:
    host = first_host(env[var])
  except ValueError:
    raise DistributedError(f"{var}={env[var]!r} is not a Slurm hostlist") from None
  port = _first_int(env, "JAX_COORDINATOR_PORT")
  if port is None:
    port = _slurm_port(env["SLURM_JOB_ID"])
  return Cluster(f"{host}:{_check_port(port, 'JAX_COORDINATOR_PORT')}",
                 _first_int(env, "SLURM_NTASKS"), index, "slurm", f"slurm: {var}")


def _from_tpu(env: Mapping[str, str], tpu_vm: bool) -> Cluster | None:
  """A multi-host TPU from GKE's variables or, without them, a Cloud TPU VM (GCE metadata)."""
  var = next((v for v in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES") if env.get(v)), None)
  slices = _first_int(env, "MEGASCALE_NUM_SLICES") or 1
  if var is not None:
    hosts = [h for h in env[var].split(",") if h.strip()]
    if len(hosts) * slices <= 1:
      return None
    index = (_first_int(env, "TPU_WORKER_ID") or 0) + (
        _first_int(env, "MEGASCALE_SLICE_ID") or 0) * len(hosts)
    return Cluster(None, len(hosts) * slices, index, "tpu", f"tpu: {var}")
  hints = ("MEGASCALE_NUM_SLICES", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_ID")
  if any(h in env for h in hints) or (tpu_vm and "TPU_SKIP_MDS_QUERY" not in env):
    return Cluster(None, 0, 0, "tpu", "tpu: detected by jax")
  return None


def _jax_sees_tpu_vm() -> bool:
  # Set when jax was imported: TPU chips on the PCI bus and libtpu installed (private, so a
  # missing attribute in a later jax means "not a TPU VM" rather than a crash).
  from jax._src import cloud_tpu_init
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _split_address(address: str, env: Mapping[str, str] | None, name: str) -> tuple[str, int]:
  """(host, port) of "host", "host:port", "[v6]:port" or a bare IPv6 address."""
  address = address.strip()
  if m := re.fullmatch(r"(\[[^\]]+\])(?::(.*))?", address):
    host, port = m.group(1), m.group(2)
  elif address.count(":") == 1:
    host, port = address.split(":")
  elif address.count(":") > 1:
    host, port = f"[{address}]", None  # a bare IPv6 address: jax splits on the last ':'
  else:
    host, port = address, None
  if not host:
    raise DistributedError(f"{name}={address!r} has no host")
  if port is not None:
    return host, _check_port(_parse_int(name, address, port), name)
  port = _first_int(env or {}, "JAX_COORDINATOR_PORT")
  return host, _check_port(DEFAULT_PORT if port is None else port, "JAX_COORDINATOR_PORT")


def _first_int(env: Mapping[str, str], *names: str) -> int | None:
  """The integer value of the first of `names` that is set (non-empty), else None."""
  for name in names:
    if (value := env.get(name, "").strip()) != "":
      return _parse_int(name, value, value)
  return None


def _parse_int(name: str, shown: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={shown!r} is not an integer") from None


def _check_port(port: int, name: str) -> int:
  if not 0 < port < 65536:
    raise DistributedError(f"{name}: port {port} is not in 1..65535")
  return port


def _slurm_port(job_id: str) -> int:
  # Consecutive job ids (the usual concurrent jobs) get consecutive ports; an id that is not
  # a number (unusual) gets a stable hash.
  base, span = _SLURM_PORTS
  number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
  return base + number % span


def _check_ids(num_processes: int, process_id: int) -> None:
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise DistributedError(f"distributed start: process id {process_id} is not in "
                           f"0..{num_processes - 1} (num_processes={num_processes})")


def _jax_kwargs(cluster: Cluster, heartbeat_timeout_s: int) -> dict:
  """jax.distributed.initialize's arguments, less the timeout (`_connect` adds it)."""
  kwargs = dict(heartbeat_timeout_seconds=heartbeat_timeout_s)
  if cluster.coordinator is None:  # TPU: jax detects the rest
    return kwargs
  _check_ids(cluster.num_processes, cluster.process_id)
  kwargs.update(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                process_id=cluster.process_id)
  if cluster.source != "slurm":
    # Everything is known: jax's own detection would only add noise (its Kubernetes probe
    # warns when the `kubernetes` package is absent) or one-GPU-per-process on Slurm.
    kwargs["cluster_detection_method"] = "deactivate"
  return kwargs


def _check_port_free(cluster: Cluster, timeout_s: int) -> None:
  """Process 0 serves on all interfaces at the coordinator's port: it must be free.

  jax 0.10.2 segfaults (exit 139, within a second) when that port is taken, e.g. by an
  earlier run that is still alive, so this asks first (bind only: the check leaves nothing
  behind). Skipped when JAX_COORDINATOR_BIND_ADDRESS chooses the address.
  """
  if os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
    return
  port = int(cluster.coordinator.rsplit(":", 1)[1])
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
    try:
      with socket.socket(family) as s:
        # As gRPC does: a port held only by TIME_WAIT connections of a previous run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))  # "::" also covers IPv4 (Linux binds both by default)
      return
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise DistributedError(_start_failure(
            cluster, timeout_s, f"port {port} on this host is in use")) from None
      # any other error (no IPv6 here): try the next family, else leave it to jax


def _connect(kwargs: dict, timeout_s: int) -> BaseException | None:
  """Runs jax.distributed.initialize with a deadline; returns what went wrong, if anything.

  jax does not raise when the peers or the coordinator never come: at the end of its own
  timeout it aborts the whole process (SIGABRT, with a C++ stack trace and no Python
  exception). So jax runs in a daemon thread with a longer timeout, and at `timeout_s` this
  gives up on it: the caller gets an error to report, and at interpreter exit the process
  leaves with status 1 without jax's shutdown (which would wait on the half-open
  connection and log after the error line). If it is still running `_JAX_GRACE_S` later,
  jax aborts it.
  """
  outcome: list[BaseException | None] = []

  def run():
    try:
      jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s + _JAX_GRACE_S)
      outcome.append(None)
    except Exception as e:  # any failure to start is the same story for the user
      outcome.append(e)

  thread = threading.Thread(target=run, name="jax.distributed.initialize", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if outcome:
    return outcome[0]
  atexit.register(_exit_now, 1)  # runs before jax's own atexit shutdown (LIFO)
  return TimeoutError("not every process joined: are all of them started, and is the "
                      "coordinator reachable from here?")


def _exit_now(status: int) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def _start_failure(cluster: Cluster, timeout_s: int, error: BaseException | str) -> str:
  """One line: who could not join whom, from where, within what, and jax's first line."""
  first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
  if len(first) > _ERROR_CHARS:
    first = first[:_ERROR_CHARS - 3] + "..."
  who = (f"process {cluster.process_id} of {cluster.num_processes}"
         if cluster.num_processes else "this process")
  where = cluster.coordinator or "(found by jax on TPU)"
  origin = f" ({cluster.origin})" if cluster.origin else ""
  return (f"distributed start: {who} could not join the coordinator {where}{origin} "
          f"within {timeout_s} s: {first}")


def _as_started(cluster: Cluster) -> Cluster:
  """On TPU jax decided the process count and index: report those."""
  if cluster.source != "tpu":
    return cluster
  from jax._src import distributed as jax_distributed  # private: jax.process_count() would
  state = jax_distributed.global_state  # start the backend, which the caller may configure
  return dataclasses.replace(cluster, num_processes=state.num_processes,
                             process_id=state.process_id)


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process reaches `name`, through the coordination service (no device
  collective); nothing on one process.

  The train step's first run starts XLA's collectives (Gloo on CPU, NCCL on GPU), whose
  rendezvous waits only so long for late peers (Gloo: 30 s); a peer still compiling under
  load arrives later than that. Compiling first and meeting here makes the wait XLA's
  compile time on the slowest host, bounded by `timeout_s` instead.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed

  client = jax_distributed.global_state.client
  if client is None:  # a runtime that starts without jax.distributed (none known today)
    return
  client.wait_at_barrier(f"mm_jax_{name}", timeout_in_ms=timeout_s * 1000)
