"""Faults inside one process: corrupt checkpoints, non-finite steps, changed configs, bad
workdirs, a save that fails. Each asserts the one-line message and what is left on disk."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config

from mm_jax import sharding
from mm_jax.config import ConfigError
from mm_jax.data import pipeline
from mm_jax.faults import CheckpointError, Diverged
from mm_jax.train import batches, loop, recovery
from mm_jax.train import state as state_lib
from mm_jax.train.checkpoint import QUARANTINE, Checkpointer

FAST = {"train.batch_size": 8, "train.log_every": 1, "checkpoint.every": 5,
        "checkpoint.keep": 5, "data.num_train": 96, "data.num_eval": 16,
        "eval.generate": False}


def _cfg(**overrides):
  return tiny_config(**{**FAST, **overrides})


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 10-step run with checkpoints at 5 and 10."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.train(_cfg(**{"train.steps": 10}), workdir)
  return workdir


def _largest_array_file(workdir, step):
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                    recursive=True)
  return max(files, key=os.path.getsize)


def _flip(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x40
  open(path, "wb").write(data)


def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])


def _metadata_only(workdir, step):
  folder = os.path.join(workdir, "checkpoints", str(step))
  for name in os.listdir(folder):
    if name != "_CHECKPOINT_METADATA":
      path = os.path.join(folder, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _edit_data_position(workdir, step):
  """One byte of the data position changed, still valid JSON: another place in the data."""
  path = os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")
  text = open(path).read()
  index = json.loads(text)["parent"]["parent"]["next_index"]
  edited = text.replace(f'"next_index": {index}', f'"next_index": {index + 1}', 1)
  assert edited != text and len(edited) == len(text)
  open(path, "w").write(edited)


def _edit_counter(workdir, step):
  """The record's skip counter changed (as a careless repair would): valid JSON still."""
  path = os.path.join(workdir, "checkpoints", str(step), "integrity", "metadata")
  record = json.load(open(path))
  record["counters"]["skipped_nonfinite"] += 1
  json.dump(record, open(path, "w"))


def _no_integrity(workdir, step, flip=False):
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "integrity"))
  if flip:
    _flip(_largest_array_file(workdir, step))


# fault -> (stage it on checkpoint 10, what the one line says)
CORRUPTIONS = {
    "flipped_byte": (lambda w: _flip(_largest_array_file(w, 10)), "array "),
    "truncated_file": (lambda w: _truncate(_largest_array_file(w, 10)), "array "),
    "deleted_file": (lambda w: os.remove(_largest_array_file(w, 10)), "array "),
    "metadata_only": (lambda w: _metadata_only(w, 10), "metadata unreadable"),
    "data_position_edited": (lambda w: _edit_data_position(w, 10),
                             "data position process_0-of-1.json does not match its digest"),
    "counter_edited": (lambda w: _edit_counter(w, 10),
                       "integrity record does not match its own digest"),
    "integrity_deleted": (lambda w: _no_integrity(w, 10), "no integrity record"),
    "integrity_deleted_array_flipped": (lambda w: _no_integrity(w, 10, flip=True),
                                        "no integrity record"),
}


@pytest.mark.parametrize("fault", sorted(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous(fault, trained, tmp_path,
                                                                capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  stage, said = CORRUPTIONS[fault]
  stage(workdir)
  cfg = _cfg(**{"train.steps": 10})
  mesh = sharding.make_mesh(cfg.mesh)
  built = state_lib.build(cfg, mesh)
  data = pipeline.train_iterator(cfg.data, batches.row_spec(cfg), global_batch=8, seed=0)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  with jax.set_mesh(mesh):
    state, step = recovery.restore_latest(built, cfg, ckpt, workdir, data)
  ckpt.close()
  assert step == 5 and int(state.step) == 5
  lines = [line for line in capsys.readouterr().out.splitlines() if "unusable" in line]
  assert len(lines) == 1 and lines[0].startswith("checkpoint step 10 is unusable: ")
  assert said in lines[0], lines[0]
  if said == "array ":  # the array is named
    assert "array params/" in lines[0] or "array opt_state/" in lines[0], lines[0]
  assert os.listdir(os.path.join(workdir, QUARANTINE)) == ["10"]  # kept, not deleted
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["5"]


@pytest.mark.parametrize("fault", ["flipped_byte", "data_position_edited"])
def test_a_corrupt_checkpoint_resumes_from_the_previous_to_the_same_loss(fault, trained,
                                                                         tmp_path):
  straight = _records(trained)
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  CORRUPTIONS[fault][0](workdir)
  result = loop.train(_cfg(**{"train.steps": 10}), workdir)  # redoes steps 6-10
  np.testing.assert_allclose(result["loss"], straight[9]["loss"], rtol=1e-6)
  steps = [r["step"] for r in _records(workdir) if "loss" in r]
  assert steps == list(range(1, 11))  # the replayed steps once each


def test_a_checkpoint_without_its_record_resumes_unverified_only_when_allowed(trained, tmp_path,
                                                                              capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  _no_integrity(workdir, 10)
  cfg = _cfg(**{"train.steps": 10, "checkpoint.allow_unverified": True})
  mesh = sharding.make_mesh(cfg.mesh)
  built = state_lib.build(cfg, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  with jax.set_mesh(mesh):
    _, step = recovery.restore_latest(built, cfg, ckpt, workdir)
  ckpt.close()
  assert step == 10
  assert "checkpoint step 10: no integrity record; used unverified" in capsys.readouterr().out


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  for step in (5, 10):
    _flip(_largest_array_file(workdir, step))
  with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
    loop.train(_cfg(**{"train.steps": 10}), workdir)
  with pytest.raises(CheckpointError, match="remove .*checkpoints_unusable to train"):
    loop.train(_cfg(**{"train.steps": 10}), workdir)  # and again: never from scratch


@pytest.mark.parametrize("key,value,what", [
    ("model.decoder.mlp_dim", 384, ("in the checkpoint", "now")),
    # The other layout: [L, ...] stacks where the checkpoint has one array per layer.
    ("model.scan_layers", True, ("is not in the checkpoint",)),
])
def test_a_changed_model_is_refused_naming_the_parameter_and_the_key(trained, tmp_path, key,
                                                                      value, what):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  with pytest.raises(ConfigError) as e:
    loop.train(_cfg(**{"train.steps": 10, key: value}), workdir)
  message = str(e.value)
  assert "\n" not in message
  assert "resume from step 10" in message and all(w in message for w in what)
  old = {"model.decoder.mlp_dim": 256, "model.scan_layers": False}[key]
  assert f"config.{key}: {old} -> {value}" in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "5"]  # untouched


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
  real, calls = pipeline.global_batch, [0]

  def poisoned(local, shardings):
    calls[0] += 1
    if calls[0] in (3, 4):  # steps 3 and 4 see NaN pixels: NaN loss and gradients
      local = {**local, "images": np.full_like(local["images"], np.nan)}
    return real(local, shardings)

  monkeypatch.setattr(pipeline, "global_batch", poisoned)
  workdir = str(tmp_path)
  cfg = _cfg(**{"train.steps": 6, "checkpoint.every": 2})
  loop.train(cfg, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    text = f.read()
  assert "NaN" not in text
  records = [json.loads(line) for line in text.splitlines()]
  by_step = {r["step"]: r for r in records if "loss" in r}
  assert by_step[3]["loss"] is None and by_step[4]["loss"] is None  # null, valid JSON
  assert by_step[4]["train/skipped_nonfinite"] == 2  # exact at the step itself
  assert by_step[6]["train/skipped_nonfinite"] == 2 and np.isfinite(by_step[6]["loss"])
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  # Step 4 skipped its update: no checkpoint of it (its state may have started the streak).
  assert ckpt.all_steps() == [2, 6]
  assert ckpt.read_counters(6) == {"skipped_nonfinite": 2}
  ckpt.close()


def test_divergence_stops_after_the_cap_and_writes_no_nonfinite_checkpoint(tmp_path):
  workdir = str(tmp_path)
  cfg = _cfg(**{"train.steps": 40, "checkpoint.every": 2, "optim.lr": 1e30,
                "train.max_nonfinite_steps": 3})
  with pytest.raises(Diverged, match="3 non-finite steps in a row") as e:
    loop.train(cfg, workdir)
  assert "\n" not in str(e.value)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  for step in ckpt.all_steps():
    record = ckpt._read_json(step, "integrity")
    assert all(a["finite"] for a in record["arrays"].values()), step
  ckpt.close()
  with open(os.path.join(workdir, "goodput.jsonl")) as f:
    assert json.loads(f.readlines()[-1])["status"] == "diverged"


def test_a_streak_that_ends_the_run_sets_aside_the_checkpoint_that_may_have_started_it(
    trained, tmp_path, monkeypatch):
  """Steps 7-9 non-finite (max 3): no checkpoint is written during the streak, checkpoint 6
  (the state step 7 started from) is set aside, and the message names step 4 as the resume
  point. The same command without the bad data resumes there and ends with the loss of the
  uninterrupted run."""
  real, calls = pipeline.global_batch, [0]

  def poisoned(local, shardings):
    calls[0] += 1
    if calls[0] >= 7:
      local = {**local, "images": np.full_like(local["images"], np.nan)}
    return real(local, shardings)

  monkeypatch.setattr(pipeline, "global_batch", poisoned)
  workdir = str(tmp_path)
  cfg = _cfg(**{"train.steps": 10, "checkpoint.every": 2, "train.max_nonfinite_steps": 3})
  with pytest.raises(Diverged) as e:
    loop.train(cfg, workdir)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("diverged: 3 non-finite steps in a row, steps 7-9 "), message
  assert "checkpoint(s) 6 (from step 6 on" in message, message
  assert "the same command resumes from step 4" in message, message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2", "4"]
  assert os.listdir(os.path.join(workdir, QUARANTINE)) == ["6"]
  monkeypatch.undo()  # the data is fixed
  result = loop.train(cfg, workdir)
  np.testing.assert_allclose(result["loss"], _records(trained)[9]["loss"], rtol=1e-6)


def test_an_infinite_update_from_the_first_step_diverges_with_nothing_written(tmp_path):
  workdir = str(tmp_path)
  cfg = _cfg(**{"train.steps": 20, "checkpoint.every": 2, "optim.lr": 1e39,
                "train.max_nonfinite_steps": 3})
  with pytest.raises(Diverged, match=r"steps 1-3 .*no checkpoint was written before it"):
    loop.train(cfg, workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == []


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(ConfigError, match=r"exists and is not a directory"):
    loop.train(_cfg(), str(path))


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path):
  with pytest.raises(ConfigError, match=r"not writable"):
    loop.train(_cfg(), "/proc/mm_jax_run")  # /proc refuses new entries, also to root


def test_sigint_and_sigterm_set_the_stop_flag_and_a_second_is_ignored():
  import signal

  from mm_jax.train import stopping

  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  for sig in (signal.SIGINT, signal.SIGTERM):
    with stopping.StopSignals() as signals:
      os.kill(os.getpid(), sig)  # no KeyboardInterrupt, no exit
      os.kill(os.getpid(), signal.SIGTERM)  # a second: reported, ignored
      assert signals.received == signal.Signals(sig).name
      assert signals.rows(3).tolist() == [True, True, True]
    # restored (a background job starts with SIGINT ignored, so compare with what was there)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_failure_while_a_committed_save_is_unconfirmed_names_the_failed_step(tmp_path):
  """The race CI found: step 3 committed but not yet confirmed when step 6's save fails;
  orbax raises once for both. The failed step is the oldest one not on disk, and the one on
  disk is named as intact."""
  from mm_jax.config import CheckpointConfig

  os.makedirs(tmp_path / "3" / "state")
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig())
  ckpt._pending = [3, 6]
  error = str(ckpt._save_failed(3, OSError("No space left on device")))
  assert error.startswith("checkpoint step 6 failed to save (No space left on device)"), error
  assert error.endswith(f"newest intact checkpoint: step 3 in {tmp_path}"), error
  ckpt.close()
