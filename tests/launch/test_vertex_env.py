"""launch/vertex_env.py: Vertex AI's CLUSTER_SPEC becomes the JAX_* variables main.py reads."""

import json

import pytest

from launch import vertex_env


def _spec(task_type: str, index: int, workers: int = 2) -> str:
  return json.dumps({
      "cluster": {"workerpool0": ["primary-0:2222"],
                  "workerpool1": [f"worker-{i}:2222" for i in range(workers)]},
      "environment": "cloud", "task": {"type": task_type, "index": index}})


def test_primary_is_coordinator_and_process_zero():
  env = vertex_env.jax_env(_spec("workerpool0", 0), {"JAX_COORDINATOR_PORT": "8476"})
  assert env == {"JAX_COORDINATOR_ADDRESS": "primary-0", "JAX_NUM_PROCESSES": "3",
                 "JAX_PROCESS_ID": "0"}


def test_workers_follow_the_primary():
  env = vertex_env.jax_env(_spec("workerpool1", 1), {})
  assert env["JAX_PROCESS_ID"] == "2" and env["JAX_COORDINATOR_PORT"] == "2222"


def test_single_replica_changes_nothing():
  one = json.dumps({"cluster": {"workerpool0": ["a:1"]}, "task": {"type": "workerpool0"}})
  assert vertex_env.jax_env(one, {}) == {}


def test_mismatched_process_count_is_an_error():
  with pytest.raises(vertex_env.ClusterSpecError, match="lists 3 replicas"):
    vertex_env.jax_env(_spec("workerpool1", 0), {"JAX_NUM_PROCESSES": "4"})
