"""Sample -> tokens + media rows -> batches, through grain, one shard per JAX process.

Every batch is a dict of numpy arrays with DESIGN.md's keys and static shapes:
tokens/targets/loss_mask/segment_ids/positions [B, T], images float32[B*Mi, S, S, 3],
image_valid bool[B*Mi]. Packing several samples per row is issue 4; here each sample
takes one row (segment 1) and the tail is padding (segment 0).
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from mm_jax.config import DataConfig, VisionConfig
from mm_jax.data import synthetic
from mm_jax.data.text import IMAGE_TAG, WordTokenizer, render


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """What the model needs from the pipeline: lengths, placeholder id, image geometry."""

  seq_len: int
  images_per_sample: int
  image_token_id: int
  tokens_per_image: int
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @classmethod
  def create(cls, data: DataConfig, vision: VisionConfig, image_token_id: int) -> RowSpec:
    return cls(data.seq_len, data.images_per_sample, image_token_id, vision.tokens_per_image,
               vision.image_size, vision.mean, vision.std)


def synthetic_tokenizer() -> WordTokenizer:
  return WordTokenizer(synthetic.WORDS)


class SampleError(ValueError):
  """A sample that cannot become a row; the message names the sample id."""


def normalise(image: np.ndarray, spec: RowSpec) -> np.ndarray:
  """uint8[S, S, 3] -> float32[S, S, 3] with the tower's mean/std."""
  x = image.astype(np.float32) / 255.0
  return (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


def to_row(sample: dict, tokenizer: WordTokenizer, spec: RowSpec) -> dict[str, np.ndarray]:
  """One sample -> one padded row of every batch key (images as [Mi, S, S, 3])."""
  images = [sample["image"]] if "image" in sample else list(sample.get("images", []))
  n_tags = sample["prompt"].count(IMAGE_TAG)
  if n_tags != len(images):
    raise SampleError(f"{sample['id']}: {n_tags} {IMAGE_TAG} tags but {len(images)} images")
  if len(images) > spec.images_per_sample:
    raise SampleError(f"{sample['id']}: {len(images)} images > data.images_per_sample "
                      f"{spec.images_per_sample}")
  enc = render(tokenizer, sample["prompt"], sample["answer"],
               image_token_id=spec.image_token_id, tokens_per_image=spec.tokens_per_image)
  n, t = len(enc.tokens), spec.seq_len
  if n > t + 1:  # the last token is only a target, so T + 1 ids fit a row of length T
    raise SampleError(f"{sample['id']}: {n} tokens do not fit data.seq_len {t}")
  ids = np.zeros(t + 1, np.int32)
  ids[:n] = enc.tokens
  answer = np.zeros(t + 1, bool)
  answer[:n] = enc.answer
  s = spec.image_size
  pixels = np.zeros((spec.images_per_sample, s, s, 3), np.float32)
  for i, image in enumerate(images):
    pixels[i] = normalise(image, spec)
  return {
      "tokens": ids[:t], "targets": ids[1:], "loss_mask": answer[1:],
      "segment_ids": (np.arange(t) < n).astype(np.int32),
      "positions": np.arange(t, dtype=np.int32),
      "images": pixels, "image_valid": np.arange(spec.images_per_sample) < len(images),
  }


def collate(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's stacked rows -> batch: media items flattened to [B*Mi, ...]."""
  out = dict(rows)
  for key in ("images", "image_valid"):
    out[key] = rows[key].reshape((-1,) + rows[key].shape[2:])
  return out


def synthetic_dataset(data: DataConfig, spec: RowSpec, *, split: str) -> grain.MapDataset:
  tokenizer = synthetic_tokenizer()
  n = data.num_train if split == "train" else data.num_eval

  def make(index: int) -> dict[str, np.ndarray]:
    sample = synthetic.example(int(index), split=split, seed=data.seed,
                               image_size=spec.image_size, task=data.task)
    return to_row(sample, tokenizer, spec)

  return grain.MapDataset.range(n).map(make)


def train_iterator(data: DataConfig, spec: RowSpec, *, global_batch: int, seed: int
                   ) -> grain.DatasetIterator:
  """Endless, shuffled, checkpointable iterator over this process's share of the batch."""
  ds = synthetic_dataset(data, spec, split="train")
  ds = ds.shuffle(seed=seed).repeat(None)
  return _batched(ds, data, global_batch)


def eval_iterator(data: DataConfig, spec: RowSpec, *, global_batch: int
                  ) -> grain.DatasetIterator:
  """One pass over the held-out split (the last partial batch is dropped)."""
  return _batched(synthetic_dataset(data, spec, split="eval"), data, global_batch)


def _batched(ds: grain.MapDataset, data: DataConfig, global_batch: int
             ) -> grain.DatasetIterator:
  pc, pi = jax.process_count(), jax.process_index()
  if global_batch % pc:
    raise ValueError(f"config.train.batch_size {global_batch} not divisible by {pc} processes")
  ds = ds[pi::pc]  # each process reads only its own samples
  it = ds.to_iter_dataset()
  if data.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
  it = it.batch(global_batch // pc, drop_remainder=True).map(collate)
  return iter(it)


def global_batch(local: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays laid out by `shardings`."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def batch_shapes(spec: RowSpec, batch: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Global shapes and dtypes of every batch key (for abstract compilation)."""
  t, m, s = spec.seq_len, spec.images_per_sample, spec.image_size
  return {"tokens": ((batch, t), np.int32), "targets": ((batch, t), np.int32),
          "loss_mask": ((batch, t), np.bool_), "segment_ids": ((batch, t), np.int32),
          "positions": ((batch, t), np.int32), "images": ((batch * m, s, s, 3), np.float32),
          "image_valid": ((batch * m,), np.bool_)}
