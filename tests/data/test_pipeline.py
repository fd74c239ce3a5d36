import dataclasses

import jax
import numpy as np
import pytest
from conftest import tiny_config

from mm_jax.data import pipeline, synthetic
from mm_jax.data.text import IMAGE_TAG


def _spec(**overrides):
  cfg = tiny_config(**overrides)
  return cfg, pipeline.RowSpec.create(cfg.data, cfg.model)


def test_batch_contract():
  cfg, spec = _spec(**{"data.images_per_sample": 2})
  batch = next(pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0))
  shapes = pipeline.batch_shapes(spec, 4)
  assert set(batch) == set(shapes)
  for key, (shape, dtype) in shapes.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  p, img = spec.tokens_per_image, spec.image_token_id
  # One valid image per sample (slot 0), its P placeholders right after <bos>.
  np.testing.assert_array_equal(batch["image_valid"], [True, False] * 4)
  assert ((batch["tokens"] == img).sum(1) == p).all()
  assert (batch["tokens"][:, 1:1 + p] == img).all()
  # Next-token targets; the loss only on the answer and <eos>.
  inside = batch["segment_ids"][:, 1:] > 0  # next-token targets inside each sample
  np.testing.assert_array_equal(batch["targets"][:, :-1][inside], batch["tokens"][:, 1:][inside])
  assert not batch["loss_mask"][batch["tokens"] == img].any()
  eos = pipeline.synthetic_tokenizer().eos_id
  for row in range(4):
    last = np.flatnonzero(batch["loss_mask"][row])[-1]
    assert batch["targets"][row, last] == eos
    n = batch["segment_ids"][row].sum()
    assert batch["segment_ids"][row, :n].all() and not batch["segment_ids"][row, n:].any()
    assert last == n - 1  # <eos> is only a target: it sits under the last real token


def test_deterministic_and_splits_disjoint():
  a = synthetic.example(7, split="train", seed=0, image_size=32, task="qa")
  b = synthetic.example(7, split="train", seed=0, image_size=32, task="qa")
  c = synthetic.example(7, split="eval", seed=0, image_size=32, task="qa")
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["prompt"] == b["prompt"] and a["answer"] == b["answer"]
  assert not np.array_equal(a["image"], c["image"])


def test_images_show_what_the_answers_say():
  for i in range(30):
    rng = np.random.default_rng(i)
    scene, image = synthetic.draw_scene(rng, 32)
    colour = np.array(synthetic.COLOURS[scene.colour])
    painted = (image == colour).all(-1)
    for q in range(4):  # objects exactly in the quadrants the scene lists
      quadrant = painted[(q // 2) * 16:(q // 2 + 1) * 16, (q % 2) * 16:(q % 2 + 1) * 16]
      assert quadrant.any() == (q in scene.quadrants), (i, q)


def test_caption_task_and_answers_vocabulary():
  ex = synthetic.example(3, split="train", seed=0, image_size=32, task="caption")
  assert ex["prompt"] == [IMAGE_TAG]
  tok = pipeline.synthetic_tokenizer()
  assert tok.unk_id not in tok.encode(ex["answer"])


def test_iterator_resumes_from_its_state():
  cfg, spec = _spec()
  it = pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  it2 = pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["tokens"], expected["tokens"])


def test_bad_samples_name_the_record():
  from mm_jax.data.errors import BadRecord
  from mm_jax.data.text import render

  _, spec = _spec()
  tok = pipeline.synthetic_tokenizer()
  image = np.zeros((32, 32, 3), np.uint8)
  enc = render(tok, [IMAGE_TAG, IMAGE_TAG], ["red"], image_token_id=spec.image_token_id,
               tokens_per_image=spec.tokens_per_image)
  with pytest.raises(BadRecord, match="rec-1: tag_mismatch: 128 image placeholder tokens but "
                     "its 1 item"):
    pipeline.to_example("rec-1", enc, [image], spec)
  enc = render(tok, [IMAGE_TAG] * 3, ["red"], image_token_id=spec.image_token_id,
               tokens_per_image=spec.tokens_per_image)
  with pytest.raises(BadRecord, match="rec-2: too_long: its first media item alone"):
    pipeline.to_example("rec-2", enc, [image] * 3, dataclasses.replace(spec, seq_len=40))


def test_packing_puts_several_samples_in_a_row():
  cfg, spec = _spec(**{"data.seq_len": 160, "data.images_per_sample": 2})
  batch = next(pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0))
  p, img = spec.tokens_per_image, spec.image_token_id
  seg, pos = batch["segment_ids"], batch["positions"]
  assert (seg.max(1) == 2).all()  # two samples per row
  for row in range(4):
    for s in (1, 2):
      where = np.flatnonzero(seg[row] == s)
      np.testing.assert_array_equal(pos[row, where], np.arange(len(where)))  # restarts
      assert (batch["tokens"][row, where][1:1 + p] == img).all()  # its image first
  assert batch["image_valid"].all()  # two images per row, in row order
  # Targets never cross a sample boundary: the last target of segment 1 is <eos>.
  eos = pipeline.synthetic_tokenizer().eos_id
  for row in range(4):
    end = np.flatnonzero(seg[row] == 1)[-1]
    assert batch["targets"][row, end] == eos and batch["loss_mask"][row, end]


def test_truncation_keeps_whole_images_or_drops_the_sample():
  from mm_jax.data.errors import BadRecord
  from mm_jax.data.text import Encoded

  _, spec = _spec(**{"data.seq_len": 40})  # 64 placeholders per image do not fit
  img = spec.image_token_id
  ids = np.array([1] + [img] * 64 + [5, 6, 2], np.int32)
  enc = Encoded(ids, np.array([False] * 66 + [True, True]))
  with pytest.raises(BadRecord, match="too_long: its first media item alone"):
    pipeline.truncate(enc, {"image": [(1, 65)]}, spec, "r1")
  _, spec = _spec(**{"data.seq_len": 80})
  text = Encoded(np.array([1] + [7] * 100 + [2], np.int32), np.array([False] + [True] * 101))
  cut, kept = pipeline.truncate(text, {"image": []}, spec, "r2")
  assert len(cut.tokens) == 81 and kept == {"image": 0}  # text-only: cut to T + 1 ids
  two = np.array([1] + [img] * 64 + [7] * 10 + [img] * 64 + [2], np.int32)
  enc = Encoded(two, np.array([False] * 75 + [True] * 65))
  with pytest.raises(BadRecord, match="no answer token"):  # cut before the 2nd image
    pipeline.truncate(enc, {"image": [(1, 65), (75, 139)]}, spec, "r3")
  answer_early = Encoded(two, np.array([False] * 66 + [True] * 9 + [False] * 65))
  cut, kept = pipeline.truncate(answer_early, {"image": [(1, 65), (75, 139)]}, spec, "r4")
  assert kept == {"image": 1} and len(cut.tokens) == 75  # the 2nd image's run dropped whole


def _with_bad_samples(monkeypatch, every: int):
  """Synthetic samples whose index is a multiple of `every` fail with tag_mismatch."""
  real = pipeline.synthetic.example

  def example(index, **kw):
    sample = real(index, **kw)
    if index % every == 0:
      sample["prompt"] = sample["prompt"] + ["<image>"]
    return sample

  monkeypatch.setattr(pipeline.synthetic, "example", example)


def test_bad_samples_are_skipped_counted_and_resumed(monkeypatch):
  from mm_jax.data import skips

  _with_bad_samples(monkeypatch, every=3)
  cfg, spec = _spec(**{"data.num_train": 60})
  stats = skips.SkipStats()
  it = pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0, stats=stats)
  for _ in range(5):
    next(it)
  assert stats.counts == {"tag_mismatch": stats.skipped} and stats.skipped >= 5
  assert 0 <= stats.seen - (20 + stats.skipped) <= 1  # the packer reads one ahead
  with pytest.raises(skips.DataError, match="max_skip_fraction"):
    skips.SkipStats(seen=200, counts={"tag_mismatch": 3}).check(0.01)
  state = it.get_state()
  stats2 = skips.SkipStats()
  it2 = pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0, stats=stats2)
  it2.set_state(state)
  assert stats2.counts == stats.counts  # counts resume with the iterator
  np.testing.assert_array_equal(next(it2)["tokens"], next(it)["tokens"])


def test_strict_mode_stops_at_the_first_bad_record(monkeypatch):
  from mm_jax.data import skips

  _with_bad_samples(monkeypatch, every=1)
  cfg, spec = _spec(**{"data.strict": True})
  it = pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0)
  with pytest.raises(skips.DataError, match=r"data.strict: record synthetic-train-\d+: "
                                            "tag_mismatch"):
    next(it)


def test_worker_processes_give_the_same_batches():
  cfg, spec = _spec()
  cfg2, _ = _spec(**{"data.worker_count": 2})
  a = pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0)
  b = pipeline.train_iterator(cfg2.data, spec, global_batch=4, seed=0)
  for _ in range(3):
    np.testing.assert_array_equal(next(a)["tokens"], next(b)["tokens"])


def test_read_threads_change_speed_not_batches():
  cfg, spec = _spec()
  assert pipeline.read_threads(cfg.data) == 1  # -1: the synthetic sources hold the GIL
  json_data = dataclasses.replace(cfg.data, source="llava_json")
  assert pipeline.read_threads(json_data) == 16
  assert pipeline.read_threads(dataclasses.replace(json_data, read_threads=0)) == 0
  its = [pipeline.train_iterator(dataclasses.replace(cfg.data, read_threads=n), spec,
                                 global_batch=4, seed=0) for n in (0, 1, 4)]
  for _ in range(3):
    a, *rest = [next(it) for it in its]
    for b in rest:
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_data_set_of_bad_records_stops_with_a_clear_error(monkeypatch):
  from mm_jax.data import skips

  _with_bad_samples(monkeypatch, every=1)
  cfg, spec = _spec(**{"data.num_train": 500})
  it = pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0)
  with pytest.raises(skips.DataError, match=r"100 of 100 records skipped .* last: record "
                                            r"synthetic-train-\d+: tag_mismatch"):
    next(it)


@pytest.mark.parametrize("source, content, split", [
    ("llava_json", "[]", "train"), ("llava_json", "", "train"), ("llava_json", "[]", "eval"),
    ("tfds", "\n", "train")], ids=["json", "jsonl", "eval_json", "tfds"])
def test_a_records_file_with_none_is_one_config_error(tmp_path, source, content, split):
  """An empty file used to end the first pass at once: a StopIteration deep in the loop."""
  from mm_jax.config import ConfigError

  path = tmp_path / ("records.json" if content.startswith("[") else "records.jsonl")
  path.write_text(content)
  cfg, spec = _spec(**{"data.source": source, "data.json": str(path),
                       "data.eval_json": str(path), "data.image_dir": str(tmp_path),
                       "data.tokenizer": "unused", "data.tfds_dir": str(tmp_path / "tfds")})
  key = "json" if split == "train" else "eval_json"
  with pytest.raises(ConfigError) as e:
    if split == "train":
      pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0)
    else:
      pipeline.eval_iterator(cfg.data, spec, global_batch=4)
  assert str(e.value) == (f"config.data.{key}: {path} holds no records (an empty JSON list or "
                          "JSON Lines file); give it at least one")


def test_eval_rows_hold_one_sample_each():
  cfg, spec = _spec(**{"data.seq_len": 160, "data.images_per_sample": 2})
  batch = next(pipeline.eval_iterator(cfg.data, spec, global_batch=4))
  assert (batch["segment_ids"].max(1) == 1).all()


def _eval_pass(cfg, spec, global_batch, **kw):
  return list(pipeline.eval_iterator(cfg.data, spec, global_batch=global_batch, **kw))


@pytest.mark.parametrize("num_eval, batches", [(200, 7), (5, 1), (64, 2)])
def test_eval_pass_scores_every_record_in_full_batches(num_eval, batches):
  cfg, spec = _spec(**{"data.num_eval": num_eval})
  got = _eval_pass(cfg, spec, 32)
  assert len(got) == batches
  assert sum(int(b["row_valid"].sum()) for b in got) == num_eval
  shapes = {**pipeline.batch_shapes(spec, 32), "kind": ((32, 1), np.int32),
            "row_valid": ((32,), np.bool_)}
  for b in got:  # one compile: every batch, the padded last one too, has a full one's shapes
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == shapes
  # Padding rows (after the real ones) count toward nothing: no loss, media or kind.
  last, real = got[-1], num_eval - 32 * (batches - 1)
  assert last["row_valid"][:real].all() and not last["row_valid"][real:].any()
  assert last["loss_mask"][:real].any(1).all() and not last["loss_mask"][real:].any()
  assert not last["image_valid"][real * spec.images_per_sample:].any()
  assert (last["kind"][real:] == -1).all() and (last["kind"][:real] >= 0).all()


def test_eval_batches_caps_the_pass():
  cfg, spec = _spec(**{"data.num_eval": 200})
  assert len(_eval_pass(cfg, spec, 32, max_batches=2)) == 2
  assert len(_eval_pass(cfg, spec, 32, max_batches=50)) == 7


def test_eval_steps_cover_the_largest_process_share():
  assert pipeline.eval_steps(200, 32, 1) == 7
  assert pipeline.eval_steps(192, 32, 1) == 6
  assert pipeline.eval_steps(5, 32, 1) == 1
  assert pipeline.eval_steps(201, 32, 2) == 7  # shares of 101 and 100, 16 rows a process
  assert pipeline.eval_steps(33, 32, 4) == 2  # shares of 9, 8, 8, 8 in rows of 8
  assert pipeline.eval_steps(3, 32, 4) == 1  # a process with no record still takes part


@pytest.mark.parametrize("num_eval, bad_every", [(201, 0), (3, 0), (90, 4)])
def test_every_process_runs_the_same_eval_steps(monkeypatch, num_eval, bad_every):
  """2 processes (jax.process_* faked): equal step counts, each record scored once, even
  where skipped records shorten one process's share."""
  if bad_every:
    _with_bad_samples(monkeypatch, every=bad_every)
  cfg, spec = _spec(**{"data.num_eval": num_eval, "data.max_skip_fraction": 0.6})
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  passes, scored = [], 0
  for pi in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda pi=pi: pi)
    passes.append(_eval_pass(cfg, spec, 32))
    scored += sum(int(b["row_valid"].sum()) for b in passes[-1])
  assert len(passes[0]) == len(passes[1]) == pipeline.eval_steps(num_eval, 32, 2)
  assert all(len(b["tokens"]) == 16 for p in passes for b in p)
  good = num_eval - (len(range(0, num_eval, bad_every)) if bad_every else 0)
  assert scored == good
  if bad_every:  # process 0 lost every 4th record (all even): it ends on a padding batch
    assert [int(b["row_valid"].sum()) for b in passes[0]] == [16, 6, 0]
