import json
import logging
import os

import numpy as np
import pytest
from conftest import tiny_config

from mm_jax.data import pipeline
from mm_jax.train import evaluate, loop
from mm_jax.train.checkpoint import Checkpointer

CFG = {"train.batch_size": 8, "train.steps": 40, "train.log_every": 5, "checkpoint.every": 10,
       "data.num_train": 96, "data.num_eval": 32,
       "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


class Crash(RuntimeError):
  pass


def _crash_after(n_batches, monkeypatch):
  """Makes the loop die on batch `n_batches + 1` (a crash between checkpoints)."""
  real, calls = pipeline.global_batch, [0]

  def crashing(local, shardings):
    calls[0] += 1
    if calls[0] > n_batches:
      raise Crash("simulated crash")
    return real(local, shardings)

  monkeypatch.setattr(pipeline, "global_batch", crashing)


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_interrupted_run_resumes_to_the_same_loss(tmp_path, monkeypatch):
  """On the 2x2x2 mesh (data, fsdp, tensor): a crash between checkpoints, then a resume."""
  cfg = tiny_config(**{**CFG, "train.steps": 20, "checkpoint.every": 5})
  straight = loop.train(cfg, str(tmp_path / "a"))

  with monkeypatch.context() as m:
    _crash_after(12, m)  # dies at step 13, after the step-10 checkpoint
    with pytest.raises(Crash):
      loop.train(cfg, str(tmp_path / "b"))
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints"), key=int) == ["5", "10"]
  resumed = loop.train(cfg, str(tmp_path / "b"))

  np.testing.assert_allclose(resumed["loss"], straight["loss"], rtol=1e-6)
  np.testing.assert_allclose(resumed["eval/loss"], straight["eval/loss"], rtol=1e-6)
  a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
  for step in (15, 20):  # every step logged after the resume matches
    np.testing.assert_allclose(b[step], a[step], rtol=1e-6)


def test_keeps_the_last_k_checkpoints(tmp_path):
  cfg = tiny_config(**{**CFG, "train.steps": 30, "checkpoint.keep": 2})
  loop.train(cfg, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["20", "30"]


def test_a_read_only_checkpointer_logs_no_orbax_warning(tmp_path, caplog):
  """--mode=eval, --mode=generate and export open checkpoints read-only: orbax's warnings
  about that choice (save_interval_steps, "Given directory is read only") are not news."""
  cfg = tiny_config().checkpoint
  Checkpointer(str(tmp_path), cfg).close()
  with caplog.at_level(logging.INFO):
    Checkpointer(str(tmp_path), cfg, read_only=True).close()
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_eval_mode_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    evaluate.evaluate(tiny_config(**CFG), str(tmp_path))


def test_eval_restores_the_weights_without_the_optimizer_state(tmp_path):
  import jax

  from mm_jax import sharding
  from mm_jax.train import state as state_lib
  from mm_jax.train.checkpoint import Checkpointer

  cfg = tiny_config(**{**CFG, "train.steps": 10})
  trained = loop.train(cfg, str(tmp_path))
  mesh = sharding.make_mesh(cfg.mesh)
  built = state_lib.build(cfg, mesh)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), cfg.checkpoint)
  with jax.set_mesh(mesh):
    full = state_lib.restore(built, cfg, ckpt, 10)
    weights = state_lib.restore(built, cfg, ckpt, 10, optimizer=False)
  ckpt.close()
  assert weights.opt_state is None and jax.tree.leaves(full.opt_state)
  for a, b in zip(jax.tree.leaves((full.params, full.frozen)),
                  jax.tree.leaves((weights.params, weights.frozen)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert a.sharding == b.sharding
  # --mode=eval (optimizer=False) scores the checkpoint as the run's own final eval did.
  evaluated = evaluate.evaluate(cfg, str(tmp_path))
  np.testing.assert_allclose(evaluated["eval/loss"], trained["eval/loss"], rtol=1e-6)
