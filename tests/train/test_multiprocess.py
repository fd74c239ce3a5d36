"""Two JAX processes on one machine (gloo collectives) train like one process.

Each process reads only its own samples (`ds[i::n]`) and feeds its local shard of the
global batch; the union of the shards is the single-process batch, so losses agree.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from conftest import tiny_config
from test_checkpoint import CFG

from mm_jax.train import loop

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  single = loop.train(tiny_config(**{**CFG, "train.steps": 6, "checkpoint.every": 3}),
                      str(tmp_path / "single"))
  port, workdir = _free_port(), str(tmp_path / "multi")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"),
                             str(port), str(i), "2", workdir], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-4000:]
  loss, eval_loss = (float(x) for x in outs[0][0].split("RESULT")[1].split())
  np.testing.assert_allclose(loss, single["loss"], rtol=1e-5)
  np.testing.assert_allclose(eval_loss, single["eval/loss"], rtol=1e-5)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["3", "6"]
  data_state = os.listdir(os.path.join(workdir, "checkpoints", "6", "data"))
  assert len([f for f in data_state if f.startswith("process_")]) == 2  # one per process
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if "loss" in r] == [5, 6]  # written by process 0 only
