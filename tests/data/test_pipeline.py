import numpy as np
import pytest
from conftest import tiny_config

from mm_jax.data import pipeline, synthetic
from mm_jax.data.text import IMAGE_TAG


def _spec(**overrides):
  cfg = tiny_config(**overrides)
  return cfg, pipeline.RowSpec.create(cfg.data, cfg.model.vision, cfg.model.image_token_id)


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
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])
  assert not batch["loss_mask"][batch["tokens"] == img].any()
  eos = pipeline.synthetic_tokenizer().eos_id
  for row in range(4):
    last = np.flatnonzero(batch["loss_mask"][row])[-1]
    assert batch["targets"][row, last] == eos
    n = batch["segment_ids"][row].sum()
    assert batch["segment_ids"][row, :n].all() and not batch["segment_ids"][row, n:].any()
    assert last == n - 2  # the <eos> target sits under the second-to-last real token


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
  _, spec = _spec()
  tok = pipeline.synthetic_tokenizer()
  image = np.zeros((32, 32, 3), np.uint8)
  two_tags = {"id": "rec-1", "image": image, "prompt": [IMAGE_TAG, IMAGE_TAG], "answer": []}
  with pytest.raises(pipeline.SampleError, match="rec-1: 2 <image> tags but 1 images"):
    pipeline.to_row(two_tags, tok, spec)
  long = {"id": "rec-2", "image": image, "prompt": [IMAGE_TAG] + ["what"] * 100, "answer": []}
  with pytest.raises(pipeline.SampleError, match="rec-2: .* do not fit data.seq_len"):
    pipeline.to_row(long, tok, spec)
