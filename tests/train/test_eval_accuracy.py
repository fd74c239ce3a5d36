"""train/evaluate.py: per-kind and per-question accuracy (_accuracy_by_kind), every held-out
record scored once (the last batch padded), and the eval_<step>.json of a training run."""

import json

import jax
import numpy as np
from conftest import tiny_config

from mm_jax import sharding
from mm_jax.train import batches, evaluate, loop
from mm_jax.train import state as state_lib
from mm_jax.train.evaluate import _accuracy_by_kind


def test_kinds_sum_their_questions_and_plain_kinds_pass_through():
  names = ("video/colour", "video/direction", "audio/pitch", "xor", "binding")
  counts = np.array([[9, 10], [1, 10], [5, 5], [3, 6], [0, 0]])  # [label, (exact, answers)]
  got = _accuracy_by_kind(names, counts)
  assert got == {"eval/accuracy/video": 0.5, "eval/accuracy/audio": 1.0,
                 "eval/accuracy/xor": 0.5, "eval/accuracy/video/colour": 0.9,
                 "eval/accuracy/video/direction": 0.1, "eval/accuracy/audio/pitch": 1.0}
  # A label no eval sample had is left out rather than reported as 0 of 0.
  assert "eval/accuracy/binding" not in got


def _evaluate(**overrides):
  """evaluate_state on freshly initialised weights of the tiny preset (seed 0)."""
  cfg = tiny_config(**{"eval.generate": False, **overrides})
  mesh = sharding.make_mesh(cfg.mesh)
  built = state_lib.build(cfg, mesh)
  with jax.set_mesh(mesh):
    state = state_lib.initialise(built, cfg)
    return evaluate.evaluate_state(cfg, built, state, mesh), built, cfg, mesh


def test_every_record_is_scored_once_and_padding_counts_for_nothing():
  padded, built, cfg, mesh = _evaluate(**{"data.num_eval": 200, "train.batch_size": 32})
  assert padded["eval/samples"] == 200  # 6 full batches and 8 of 32 rows (192 before)
  sh = batches.batch_shardings(mesh, batches.row_spec(cfg), 32)
  assert evaluate._eval_fn(built, tuple(sorted(sh.items())))._cache_size() == 1  # one compile
  # 40 divides the split: no padding row. The same records give the same sums.
  exact, *_ = _evaluate(**{"data.num_eval": 200, "train.batch_size": 40})
  assert padded.keys() == exact.keys()
  for key, value in exact.items():
    np.testing.assert_allclose(padded[key], value, rtol=1e-5, err_msg=key)


def test_a_split_smaller_than_one_batch_is_scored():
  small, *_ = _evaluate(**{"data.num_eval": 5, "train.batch_size": 32})
  exact, *_ = _evaluate(**{"data.num_eval": 5, "train.batch_size": 8})
  assert small["eval/samples"] == exact["eval/samples"] == 5
  np.testing.assert_allclose(small["eval/loss"], exact["eval/loss"], rtol=1e-5)


def test_eval_batches_still_caps_the_records():
  capped, *_ = _evaluate(**{"data.num_eval": 200, "train.batch_size": 32,
                             "train.eval_batches": 2})
  assert capped["eval/samples"] == 64


def test_generated_accuracy_scores_each_record_once():
  got, *_ = _evaluate(**{"data.num_eval": 20, "train.batch_size": 8, "eval.generate": True,
                         "generate.max_new_tokens": 4})
  assert got["eval/vqa_samples"] == got["eval/samples"] == 20  # 3 batches, 4 padding rows
  assert 0.0 <= got["eval/vqa_accuracy"] <= 1.0


def test_training_writes_eval_json_at_each_eval_as_mode_eval_does(tmp_path):
  cfg = tiny_config(**{"train.steps": 4, "train.eval_every": 2, "train.log_every": 2,
                       "train.batch_size": 8, "checkpoint.every": 4, "data.num_train": 64,
                       "data.num_eval": 20, "eval.generate": False})
  trained = loop.train(cfg, str(tmp_path))
  assert sorted(p.name for p in tmp_path.glob("eval_*.json")) == ["eval_2.json", "eval_4.json"]
  during = [json.loads((tmp_path / f"eval_{n}.json").read_text()) for n in (2, 4)]
  assert [d["step"] for d in during] == [2, 4]
  assert all(d["eval/samples"] == 20 for d in during)
  assert during[1]["eval/loss"] == trained["eval/loss"]
  evaluate.evaluate(cfg, str(tmp_path))  # --mode=eval of the step-4 checkpoint: same layout
  again = json.loads((tmp_path / "eval_4.json").read_text())
  assert list(again) == list(during[1])
  assert again["accuracy"].keys() == during[1]["accuracy"].keys()
  np.testing.assert_allclose(again["eval/loss"], during[1]["eval/loss"], rtol=1e-6)
