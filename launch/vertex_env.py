"""Container entry point: Vertex AI's CLUSTER_SPEC -> mm_jax's JAX_* variables, then main.py.

Vertex AI tells each replica of a multi-node CustomJob where it sits only at run time, in
the `CLUSTER_SPEC` variable (JSON: `cluster` maps `workerpool0`, `workerpool1`, ... to lists
of `host:port`, `task` names this replica's pool and index). mm_jax/distributed.py reads
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, so this shim translates:
the coordinator is workerpool0's one replica (the primary), processes are numbered pool by
pool. Without a multi-replica CLUSTER_SPEC (one node, a TPU VM, a local run) it changes
nothing. Variables already set win, so a launcher can still pin them.

  python -m launch.vertex_env --config=configs/llava.py:7b --workdir=gs://b/run ...
"""

import json
import os
import sys


class ClusterSpecError(ValueError):
  """CLUSTER_SPEC does not describe this replica."""


def jax_env(cluster_spec: str, environ) -> dict[str, str]:
  """The JAX_* variables for this replica of `cluster_spec` (empty for a single replica)."""
  spec = json.loads(cluster_spec)
  pools = spec.get("cluster", {})
  names = sorted(pools, key=lambda n: (len(n), n))  # workerpool0 < ... < workerpool10
  hosts = [h for n in names for h in pools[n]]
  if len(hosts) < 2:
    return {}
  task = spec.get("task", {})
  if task.get("type") not in pools:
    raise ClusterSpecError(f"CLUSTER_SPEC: task type {task.get('type')!r} not in {names}")
  offset = sum(len(pools[n]) for n in names[:names.index(task["type"])])
  process_id = offset + int(task.get("index", 0))
  expected = environ.get("JAX_NUM_PROCESSES")
  if expected and int(expected) != len(hosts):
    raise ClusterSpecError(f"CLUSTER_SPEC lists {len(hosts)} replicas but "
                           f"JAX_NUM_PROCESSES={expected}")
  primary = pools[names[0]][0]
  host, sep, port = primary.rpartition(":")
  env = {"JAX_COORDINATOR_ADDRESS": host if sep else primary,
         "JAX_NUM_PROCESSES": str(len(hosts)), "JAX_PROCESS_ID": str(process_id)}
  if sep:
    env["JAX_COORDINATOR_PORT"] = port
  return {k: v for k, v in env.items() if k not in environ}


def main(argv: list[str]) -> None:
  spec = os.environ.get("CLUSTER_SPEC")
  if spec:
    os.environ.update(jax_env(spec, os.environ))
  main_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "main.py")
  os.execv(sys.executable, [sys.executable, main_py, *argv])


if __name__ == "__main__":
  main(sys.argv[1:])
