"""One process of tests/test_distributed.py: joins the cluster its environment describes.

argv: mode timeout_s heartbeat_timeout_s. Modes: "count" prints `COUNT <jax.process_count()>`;
"loop" prints READY, then does a cross-process all-gather every 0.2 s until something ends it;
"eval" reads the tiny preset's held-out split (201 records, batch 32) through
pipeline.eval_iterator with an all-gather per batch, as evaluate_state does, and prints
`EVAL <batches> <records scored by all processes>`; "generate" runs evaluate_state with
eval.generate on the tiny preset's initial weights (GENERATE) and prints `GENERATE <json>`:
its eval/vqa_* metrics and the (generated ids, reference ids) of each row this process scored.
A DistributedError is printed to stderr as one line with exit status 1, the way main.py does.
"""

import json
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)  # the parent's 8 fake devices are not ours

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from mm_jax import distributed  # noqa: E402


def main(mode: str, timeout_s: int, heartbeat_timeout_s: int) -> None:
  jax.config.update("jax_num_cpu_devices", 2)
  try:
    cluster = distributed.initialize(distributed.detect(), timeout_s=timeout_s,
                                     heartbeat_timeout_s=heartbeat_timeout_s)
  except distributed.DistributedError as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(1)
  if mode == "count":
    print("COUNT", jax.process_count(), cluster.process_id, flush=True)
    return
  if mode == "generate":
    print("GENERATE", json.dumps(_generate()), flush=True)
    return
  if mode == "eval":
    batches, scored = _eval_pass()
    print("EVAL", batches, scored, flush=True)
    return
  print("READY", flush=True)
  for i in range(10**9):
    gathered = multihost_utils.process_allgather(np.int32(i))
    assert list(gathered) == [i] * jax.process_count(), gathered
    time.sleep(0.2)


def _eval_pass() -> tuple[int, int]:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import llava
  from mm_jax import config as config_lib
  from mm_jax.data import pipeline

  cd = llava.get_config("tiny")
  cd.data.num_eval = 201  # shares of 101 and 100 records: 7 batches of 16 rows each
  cfg = config_lib.from_config_dict(cd)
  spec = pipeline.RowSpec.create(cfg.data, cfg.model)
  batches = scored = 0
  for local in pipeline.eval_iterator(cfg.data, spec, global_batch=32):
    rows = multihost_utils.process_allgather(local["row_valid"], tiled=True)
    batches, scored = batches + 1, scored + int(rows.sum())
  return batches, scored


# 13 held-out records: shares of 7 and 6 in batches of 4 rows per process (the last ones
# padded); answers of 4 tokens at most. test_distributed.py's single-process reference
# repeats these (importing this file would undo its fake devices).
GENERATE = {"data.num_eval": 13, "train.batch_size": 8, "eval.generate": True,
            "generate.max_new_tokens": 4}


def _generate() -> dict:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import llava
  from mm_jax import config as config_lib
  from mm_jax import sharding
  from mm_jax.infer import vqa
  from mm_jax.train import evaluate
  from mm_jax.train import state as state_lib

  jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py
  cd = llava.get_config("tiny")
  for key, value in GENERATE.items():
    section, name = key.split(".")
    cd[section][name] = value
  cfg = config_lib.from_config_dict(cd)
  rows, count = [], vqa.count_correct
  def record(got, answers, *args):
    rows.extend([[int(i) for i in g], [int(i) for i in w]]
                for g, w in zip(got, answers, strict=True))
    return count(got, answers, *args)
  vqa.count_correct = record
  mesh = sharding.make_mesh(cfg.mesh)
  built = state_lib.build(cfg, mesh)
  with jax.set_mesh(mesh):
    result = evaluate.evaluate_state(cfg, built, state_lib.initialise(built, cfg), mesh)
  return {**{k: v for k, v in result.items() if k.startswith("eval/vqa")}, "rows": rows}


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
