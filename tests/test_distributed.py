"""mm_jax.distributed: cluster detection from the environment, and real multi-process start-ups.

The multi-process tests start tests/distributed_worker.py children on this machine (CPU, gloo
collectives, 2 devices each); every child has a hard deadline and is killed on the way out.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from mm_jax import distributed
from mm_jax.distributed import Cluster, DistributedError, detect

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
# What a child must not inherit: the parent's fake devices and any real cluster around us.
_CLUSTER_PREFIXES = ("XLA_FLAGS", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                     "JAX_LOCAL_DEVICE_IDS", "NNODES", "NODE_RANK", "JOB_COMPLETION_INDEX",
                     "SLURM_", "TPU_", "MEGASCALE_")


# --- detect(): one case per source -------------------------------------------------------------

def test_flags():
  assert detect({}, coordinator="10.0.0.1:1234", num_processes=2, process_id=1) == Cluster(
      "10.0.0.1:1234", 2, 1, "flags", "flags")
  assert detect({}, coordinator="h", num_processes=2, process_id=0).coordinator == "h:8476"


def test_flags_win_over_env():
  env = {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert detect(env, coordinator="b:2", num_processes=2, process_id=0).source == "flags"


@pytest.mark.parametrize("env, expected", [
    ({"JAX_COORDINATOR_ADDRESS": "c:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     ("c:9", 4, 3)),
    ({"JAX_COORDINATOR_ADDRESS": "c", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     ("c:8476", 2, 1)),
    ({"JAX_COORDINATOR_ADDRESS": "c", "JAX_COORDINATOR_PORT": "7777", "NNODES": "8",
      "NODE_RANK": "5"}, ("c:7777", 8, 5)),  # how xpk sets it
    ({"JAX_COORDINATOR_ADDRESS": "c:9", "NNODES": "2", "JOB_COMPLETION_INDEX": "1"},
     ("c:9", 2, 1)),  # an Indexed Job
    ({"JAX_COORDINATOR_ADDRESS": "c:9", "NNODES": "4", "NODE_RANK": "2",
      "JOB_COMPLETION_INDEX": "3"}, ("c:9", 4, 2)),  # the index is only a fallback
    ({"JAX_COORDINATOR_ADDRESS": "[fd00::1]:9", "NNODES": "2", "NODE_RANK": "0"},
     ("[fd00::1]:9", 2, 0)),
    ({"JAX_COORDINATOR_ADDRESS": "c:9", "NNODES": "2", "NODE_RANK": "0", "SLURM_JOB_ID": "7",
      "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_JOB_NODELIST": "n1"}, ("c:9", 2, 0)),
])
def test_env(env, expected):
  cluster = detect(env)
  assert (cluster.coordinator, cluster.num_processes, cluster.process_id) == expected
  assert cluster.source == "env"


SLURM = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
         "SLURM_JOB_NODELIST": "other[1-2]", "SLURM_STEP_NODELIST": "node[007-010,012],gpu-a1"}


def test_slurm():
  assert detect(SLURM) == Cluster("node007:13456", 8, 5, "slurm", "slurm: SLURM_STEP_NODELIST")
  job_only = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
  assert detect(job_only).coordinator == "other1:13456"
  assert detect({**SLURM, "JAX_COORDINATOR_PORT": "2222"}).coordinator == "node007:2222"
  assert detect({**SLURM, "SLURM_JOB_ID": "123457"}).coordinator == "node007:13457"
  assert detect({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).source == "single"


@pytest.mark.parametrize("nodelist, first", [
    ("node[007-010,012],gpu-a1", "node007"),
    ("gpu-a1,node[1-4]", "gpu-a1"),
    ("solo", "solo"),
    ("n[09,10-11]", "n09"),
    ("a[1-2]-b", "a1-b"),
    ("rack[2-3]-n[01-04],x9", "rack2-n01"),
])
def test_first_host(nodelist, first):
  assert distributed.first_host(nodelist) == first


@pytest.mark.parametrize("bad", ["node[1-2", "node]1[", "", ",a", "a[]"])
def test_first_host_rejects(bad):
  with pytest.raises(ValueError):
    distributed.first_host(bad)


@pytest.mark.parametrize("env, expected", [
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "2"}, (4, 2)),  # GKE
    ({"TPU_WORKER_HOSTNAMES": "h0,h1", "TPU_WORKER_ID": "1", "MEGASCALE_NUM_SLICES": "2",
      "MEGASCALE_SLICE_ID": "1"}, (4, 3)),  # multislice: index = worker + slice * hosts
    ({"TPU_WORKER_HOSTNAMES": "h0", "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1",
      "TPU_WORKER_ID": "0"}, (2, 1)),  # one host per slice, two slices
    ({"TPU_WORKER_ID": "1"}, (0, 0)),  # no worker list: jax finds it (metadata server)
])
def test_tpu_pod(env, expected):
  cluster = detect(env)
  assert (cluster.source, cluster.coordinator) == ("tpu", None)
  assert (cluster.num_processes, cluster.process_id) == expected


def test_tpu_vm_without_env_asks_jax():
  assert detect({}, tpu_vm=True).source == "tpu"  # a GCE TPU VM: workers in the metadata
  assert detect({"TPU_SKIP_MDS_QUERY": "1"}, tpu_vm=True).source == "single"


def test_single_host_tpu_is_single():
  env = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}
  assert detect(env, tpu_vm=True) == Cluster(None, 1, 0, "single")


def test_nothing_is_single():
  assert detect({}) == Cluster(None, 1, 0, "single")
  assert detect({"SLURM_JOB_ID": "5"}).source == "single"  # a one-task Slurm job


@pytest.mark.parametrize("kwargs, names", [
    (dict(env={}, coordinator="h:1"), ["num_processes", "process_id"]),
    (dict(env={}, num_processes=2, process_id=0), ["coordinator"]),
    (dict(env={"JAX_COORDINATOR_ADDRESS": "h:1"}), ["JAX_NUM_PROCESSES", "NNODES",
                                                    "JAX_PROCESS_ID", "NODE_RANK"]),
    (dict(env={"JAX_COORDINATOR_ADDRESS": "h:1", "NNODES": "2"}), ["JAX_PROCESS_ID"]),
    (dict(env={"JAX_COORDINATOR_ADDRESS": "h:1", "NNODES": "two", "NODE_RANK": "0"}),
     ["NNODES='two'"]),
    (dict(env={"JAX_COORDINATOR_ADDRESS": "h:1", "NNODES": "2", "JOB_COMPLETION_INDEX": "x"}),
     ["JOB_COMPLETION_INDEX='x'"]),
    (dict(env={"JAX_COORDINATOR_ADDRESS": "h:http", "NNODES": "2", "NODE_RANK": "0"}),
     ["JAX_COORDINATOR_ADDRESS='h:http'"]),
    (dict(env={"JAX_COORDINATOR_ADDRESS": "h", "JAX_COORDINATOR_PORT": "99999", "NNODES": "2",
               "NODE_RANK": "0"}), ["JAX_COORDINATOR_PORT", "99999"]),
    (dict(env={**SLURM, "SLURM_PROCID": "five"}), ["SLURM_PROCID='five'"]),
    (dict(env={**SLURM, "SLURM_NTASKS": "8x"}), ["SLURM_NTASKS='8x'"]),
    (dict(env={"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}),
     ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"]),
    (dict(env={**SLURM, "SLURM_STEP_NODELIST": "n[1-"}), ["SLURM_STEP_NODELIST='n[1-'"]),
    (dict(env={"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "one"}), ["TPU_WORKER_ID"]),
])
def test_errors_are_one_line_and_name_the_variable(kwargs, names):
  with pytest.raises(DistributedError) as e:
    detect(**kwargs)
  message = str(e.value)
  assert "\n" not in message
  for name in names:
    assert name in message


# --- initialize() without starting anything ----------------------------------------------------

@pytest.fixture
def fake_jax(monkeypatch):
  """Records jax.distributed.initialize's arguments instead of starting anything."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return calls


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_one_process_starts_nothing(fake_jax):
  for cluster in (Cluster(None, 1, 0, "single"), Cluster("h:1", 1, 0, "flags")):
    assert distributed.initialize(cluster) is cluster
  assert fake_jax == []


def test_arguments_handed_to_jax(fake_jax):
  port = _free_port()
  distributed.initialize(Cluster(f"127.0.0.1:{port}", 2, 0, "env"), timeout_s=5,
                         heartbeat_timeout_s=7)
  distributed.initialize(Cluster("n1:2", 2, 1, "slurm"), timeout_s=5, heartbeat_timeout_s=7)
  distributed.initialize(Cluster(None, 4, 3, "tpu"), timeout_s=5, heartbeat_timeout_s=7)
  env, slurm, tpu = fake_jax
  assert env.pop("initialization_timeout") > 5  # jax's own deadline comes after ours
  assert env == dict(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=0,
                     heartbeat_timeout_seconds=7, cluster_detection_method="deactivate")
  assert "cluster_detection_method" not in slurm  # jax picks the GPU (SLURM_LOCALID)
  assert set(tpu) == {"initialization_timeout", "heartbeat_timeout_seconds"}


def test_bad_ids_fail_before_jax(fake_jax):
  with pytest.raises(DistributedError, match=r"process id 2 is not in 0\.\.1"):
    distributed.initialize(Cluster("h:1", 2, 2, "flags"))
  assert fake_jax == []


def test_busy_port_fails_before_jax(fake_jax):
  with socket.socket() as s:
    s.bind(("", 0))
    s.listen()
    cluster = Cluster(f"127.0.0.1:{s.getsockname()[1]}", 2, 0, "flags", "flags")
    with pytest.raises(DistributedError, match="in use") as e:
      distributed.initialize(cluster)
  assert str(e.value).startswith(f"distributed start: process 0 of 2 could not join the "
                                 f"coordinator {cluster.coordinator} (flags)")
  assert fake_jax == []


def test_port_of_a_finished_run_is_free(fake_jax):
  """Connections of an earlier coordinator linger in TIME_WAIT; gRPC binds over them, so must we."""
  server = socket.socket(socket.AF_INET6)
  server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  server.bind(("::", 0))
  server.listen()
  port = server.getsockname()[1]
  client = socket.create_connection(("127.0.0.1", port))
  accepted, _ = server.accept()
  server.close()
  accepted.close()  # the server side closes first: its end of the connection is in TIME_WAIT
  time.sleep(0.1)
  client.close()
  distributed.initialize(Cluster(f"127.0.0.1:{port}", 2, 0, "flags"))
  assert len(fake_jax) == 1


def test_jax_error_becomes_one_line(monkeypatch):
  def fail(**kw):
    raise RuntimeError("UNAVAILABLE: " + "x" * 500 + "\nmore\ndetail")
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  with pytest.raises(DistributedError) as e:
    distributed.initialize(Cluster("h:1", 2, 1, "env", "env: JAX_COORDINATOR_ADDRESS"),
                           timeout_s=5)
  message = str(e.value)
  assert "\n" not in message and len(message) < 400
  assert message.startswith("distributed start: process 1 of 2 could not join the coordinator "
                            "h:1 (env: JAX_COORDINATOR_ADDRESS) within 5 s: UNAVAILABLE: xxx")


# --- real processes ----------------------------------------------------------------------------

def _child_env(**extra: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
  return {**env, **extra}


@contextlib.contextmanager
def _cluster_of(tmp_path, ids, n, mode, timeout_s, heartbeat_s=10):
  """Starts worker processes `ids` of an `n`-process cluster; kills them all on the way out.

  Yields (procs, port, report): report() is every child's stderr tail, for assertion messages.
  """
  port, procs, logs = _free_port(), [], []
  try:
    for i in ids:
      env = _child_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                       JAX_PROCESS_ID=str(i))
      out, err = tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt"
      logs.append((i, out, err))
      with open(out, "w") as fo, open(err, "w") as fe:
        procs.append(subprocess.Popen([sys.executable, WORKER, mode, str(timeout_s),
                                       str(heartbeat_s)], env=env, stdout=fo, stderr=fe,
                                      cwd=os.path.dirname(HERE)))
    yield procs, port, lambda: "".join(f"\n--- process {i} stderr:\n{err.read_text()[-3000:]}"
                                 for i, _, err in logs)
  finally:
    for p in procs:
      p.kill()
      p.wait()


def _wait(proc, timeout_s, report) -> int:
  try:
    return proc.wait(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    pytest.fail(f"a child still runs after {timeout_s} s (hung){report()}")


def test_two_processes_start_from_env(tmp_path):
  with _cluster_of(tmp_path, [0, 1], 2, "count", timeout_s=60) as (procs, _, report):
    codes = [_wait(p, 120, report) for p in procs]
    assert codes == [0, 0], report()
  for i in range(2):
    assert (tmp_path / f"out{i}.txt").read_text().split() == ["COUNT", "2", str(i)], report()


def test_two_processes_run_the_same_eval_batches(tmp_path):
  """pipeline.eval_iterator on 2 real processes (shares of 101 and 100 held-out records):
  as many batches each, every batch all-gathered, every record scored once."""
  with _cluster_of(tmp_path, [0, 1], 2, "eval", timeout_s=60) as (procs, _, report):
    codes = [_wait(p, 120, report) for p in procs]
    assert codes == [0, 0], report()
  for i in range(2):  # gloo writes its own lines to stdout too
    lines = (tmp_path / f"out{i}.txt").read_text().splitlines()
    assert [x for x in lines if x.startswith("EVAL")] == ["EVAL 7 201"], report()


@pytest.mark.parametrize("present", [0, 1])
def test_missing_peer_fails_in_one_line(tmp_path, present):
  """Only one of two processes comes: it gives up after timeout_s with the one-line error.

  Measured: exit 1 about 6.5 s after the start with timeout_s=5 (1.5 s of it is importing jax).
  Without initialize()'s own deadline jax would abort the process (SIGABRT) at its timeout.
  """
  start = time.monotonic()
  with _cluster_of(tmp_path, [present], 2, "count", timeout_s=5) as (procs, port, report):
    assert _wait(procs[0], 30, report) == 1, report()
    elapsed = time.monotonic() - start
    last = (tmp_path / f"err{present}.txt").read_text().strip().splitlines()[-1]
  assert 5 <= elapsed < 30, report()
  assert last.startswith(f"distributed start: process {present} of 2 could not join the "
                         f"coordinator 127.0.0.1:{port} (env: JAX_COORDINATOR_ADDRESS) within "
                         "5 s: not every process joined"), report()


@pytest.mark.parametrize("victim", [0, 1])
def test_survivor_of_a_killed_peer_exits(tmp_path, victim):
  """SIGKILL one of two processes in an all-gather loop: the other must end, never hang.

  Measured (heartbeat 5 s): killing process 1 ends process 0 after 5.0-5.1 s (the coordination
  service misses process 1's heartbeats); killing process 0 ends process 1 after 0.1 s (its
  link to the service breaks). Either way the survivor aborts: SIGABRT, status -6 (134 in a
  shell), with jax's "Terminating process because the JAX distributed service detected fatal
  errors" on stderr.
  """
  heartbeat_s = 5
  with _cluster_of(tmp_path, [0, 1], 2, "loop", timeout_s=60, heartbeat_s=heartbeat_s) as (
      procs, _, report):
    _wait_for_ready(tmp_path, procs, report)
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = procs[1 - victim]
    code = _wait(survivor, heartbeat_s + 15, report)
    elapsed = time.monotonic() - killed
  assert code != 0, report()
  assert elapsed < heartbeat_s + 15, report()


def _wait_for_ready(tmp_path, procs, report, timeout_s=120):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if all("READY" in (tmp_path / f"out{i}.txt").read_text() for i in range(len(procs))):
      return
    if any(p.poll() is not None for p in procs):
      pytest.fail(f"a child ended before the loop started{report()}")
    time.sleep(0.1)
  pytest.fail(f"the children did not start within {timeout_s} s{report()}")


def test_two_processes_score_generated_answers_as_one(tmp_path, monkeypatch):
  """evaluate_state with eval.generate on 2 processes x 2 devices (one decode over the global
  mesh per batch, uneven shares of 7 and 6 records) against this process alone (4 devices):
  the same eval/vqa_* metrics on both processes, each equal to the single-process ones, and
  between them every row's generated ids exactly once. Initial weights: their answers are
  wrong, but differ from row to row, so the rows check where each process's answers went."""
  from conftest import tiny_config

  from mm_jax import sharding  # the trainer's modules, imported here only: the rest of this
  from mm_jax.infer import vqa  # file's tests need none of them
  from mm_jax.train import evaluate
  from mm_jax.train import state as state_lib

  rows, count = [], vqa.count_correct
  def record(answers, references, *args):
    rows.extend([[int(i) for i in g], [int(i) for i in w]]
                for g, w in zip(answers, references, strict=True))
    return count(answers, references, *args)
  monkeypatch.setattr(vqa, "count_correct", record)
  cfg = tiny_config(**{"data.num_eval": 13, "train.batch_size": 8, "eval.generate": True,
                       "generate.max_new_tokens": 4})  # distributed_worker.GENERATE
  with _cluster_of(tmp_path, [0, 1], 2, "generate", timeout_s=60) as (procs, _, report):
    # The reference, while the children run, on as many devices as they have together.
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
    built = state_lib.build(cfg, mesh)
    with jax.set_mesh(mesh):
      alone = evaluate.evaluate_state(cfg, built, state_lib.initialise(built, cfg), mesh)
    codes = [_wait(p, 240, report) for p in procs]
    assert codes == [0, 0], report()
  got = []
  for i in range(2):
    lines = (tmp_path / f"out{i}.txt").read_text().splitlines()
    got += [json.loads(x.removeprefix("GENERATE ")) for x in lines if x.startswith("GENERATE")]
  assert len(got) == 2, report()
  assert alone["eval/vqa_samples"] == 13
  for one in got:
    assert (one["eval/vqa_accuracy"], one["eval/vqa_samples"]) == (
        alone["eval/vqa_accuracy"], alone["eval/vqa_samples"])
  assert [len(one["rows"]) for one in got] == [7, 6]
  assert sorted(got[0]["rows"] + got[1]["rows"]) == sorted(rows)
  assert len({str(g) for g, _ in rows}) > 3, ("answers too alike to tell rows apart", rows)
