"""Samples -> examples -> packed rows -> batches, through grain, one shard per JAX process.

Every batch is a dict of numpy arrays with DESIGN.md's keys and static shapes:
tokens/targets/loss_mask/segment_ids/positions [B, T], images float32[B*Mi, S, S, 3],
image_valid bool[B*Mi]. Stages:

1. source: a grain MapDataset of raw items (synthetic index, LLaVA JSON record), this
   process's share only (`ds[i::n]`).
2. example (in grain workers when `data.worker_count > 0`): decode, template, expand tags,
   shift into next-token form, truncate; a bad item becomes a `Skip` marker, never an
   exception (a worker must not die on one record).
3. skip accounting (main process, after the workers, so counts do not depend on the
   worker count): markers are dropped and counted per reason; `strict` stops at once.
4. packing: grain's first-fit packer fills rows of T tokens and Mi image slots and
   writes segment ids and positions (`data.pack=False`: one example per row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grain
import jax
import numpy as np
from absl import flags

from mm_jax.config import DataConfig, VisionConfig
from mm_jax.data import media, skips, synthetic
from mm_jax.data.errors import BadRecord
from mm_jax.data.text import IMAGE_TAG, Encoded, WordTokenizer, render


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


# ----------------------------------------------------------------------------- examples


def truncate(enc: Encoded, n_images: int, spec: RowSpec, record_id: str) -> tuple[Encoded, int]:
  """Fits an example into T + 1 ids: cuts text only, never inside an image's placeholders.

  A cut that lands inside (or before the end of) an image's placeholder run moves to the
  start of that run and drops that image and every later one. Raises `too_long` when not
  even the first image fits, or when nothing to learn (no loss token) remains.
  """
  limit = spec.seq_len + 1
  if len(enc.tokens) <= limit:
    return enc, n_images
  is_ph = enc.tokens == spec.image_token_id
  run_starts = np.flatnonzero(is_ph & ~np.concatenate([[False], is_ph[:-1]]))
  kept = int(np.sum(run_starts + spec.tokens_per_image <= limit))  # images wholly inside
  cut = limit if kept == len(run_starts) else int(run_starts[kept])
  if n_images and kept == 0:
    raise BadRecord("too_long", record_id, f"its first image alone needs more than "
                    f"data.seq_len={spec.seq_len} tokens")
  tokens, answer = enc.tokens[:cut], enc.answer[:cut]
  if not answer[1:].any():
    raise BadRecord("too_long", record_id, f"no answer token within data.seq_len="
                    f"{spec.seq_len} after truncation")
  return Encoded(tokens, answer), kept


def to_example(record_id: str, enc: Encoded, images: list[np.ndarray], spec: RowSpec
               ) -> dict[str, np.ndarray]:
  """Encoded ids + images -> next-token example {tokens, targets, loss_mask, images}."""
  n_tags = int(np.sum(enc.tokens == spec.image_token_id)) // max(spec.tokens_per_image, 1)
  if n_tags != len(images):
    raise BadRecord("tag_mismatch", record_id,
                      f"{n_tags} {IMAGE_TAG} tags but {len(images)} images")
  enc, kept = truncate(enc, len(images), spec, record_id)
  if kept > spec.images_per_sample:
    raise BadRecord("too_many_images", record_id, f"{kept} images > data.images_per_sample "
                    f"{spec.images_per_sample}")
  s = spec.image_size
  pixels = np.zeros((kept, s, s, 3), np.float32)
  for i, image in enumerate(images[:kept]):
    pixels[i] = (image if image.dtype == np.float32
                 else media.normalise(image, spec.mean, spec.std))
  return {"tokens": enc.tokens[:-1], "targets": enc.tokens[1:], "loss_mask": enc.answer[1:],
          "images": pixels}


def guarded(make: Callable[[object], dict], describe: Callable[[object], str]
            ) -> Callable[[object], dict]:
  """Wraps an example maker so that a bad record becomes a skip marker."""
  def run(item):
    try:
      return make(item)
    except BadRecord as e:
      return skips.marker(e.reason, e.record_id, str(e))
    except Exception as e:  # noqa: BLE001  (a worker must survive any one record)
      return skips.marker("error", describe(item), f"{type(e).__name__}: {e}")
  return run


# ----------------------------------------------------------------------------- sources


def synthetic_examples(data: DataConfig, spec: RowSpec, *, split: str
                       ) -> tuple[grain.MapDataset, Callable]:
  tokenizer = synthetic_tokenizer()
  n = data.num_train if split == "train" else data.num_eval

  def make(index) -> dict[str, np.ndarray]:
    sample = synthetic.example(int(index), split=split, seed=data.seed,
                               image_size=spec.image_size, task=data.task)
    enc = render(tokenizer, sample["prompt"], sample["answer"],
                 image_token_id=spec.image_token_id, tokens_per_image=spec.tokens_per_image)
    return to_example(sample["id"], enc, [sample["image"]], spec)

  return grain.MapDataset.range(n), guarded(make, lambda i: f"synthetic-{split}-{i}")


def source_examples(data: DataConfig, spec: RowSpec, *, split: str):
  """(MapDataset of raw items, item -> example-or-marker) for the configured source."""
  if data.source == "synthetic":
    return synthetic_examples(data, spec, split=split)
  from mm_jax.data import llava

  return llava.llava_examples(data, spec, split=split)


# ----------------------------------------------------------------------------- batches


def collate(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's stacked rows -> batch: media items flattened to [B*Mi, ...]."""
  out = dict(rows)
  for key in ("images", "image_valid"):
    out[key] = rows[key].reshape((-1,) + rows[key].shape[2:])
  return out


def _row_from_packed(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"tokens": p["tokens"], "targets": p["targets"],
          "loss_mask": p["loss_mask"].astype(bool), "segment_ids": p["tokens_segment_ids"],
          "positions": p["tokens_positions"], "images": p["images"],
          "image_valid": p["images_segment_ids"] > 0}


def _iterator(items: grain.MapDataset, make: Callable, data: DataConfig, spec: RowSpec,
              global_batch: int, stats: skips.SkipStats) -> grain.DatasetIterator:
  pc, pi = jax.process_count(), jax.process_index()
  if global_batch % pc:
    raise ValueError(f"config.train.batch_size {global_batch} not divisible by {pc} processes")
  it = items[pi::pc].map(make).to_iter_dataset()  # each process reads only its own items
  if data.worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (library use, tests)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
  it = skips.SkipFilterIterDataset(it, stats, strict=data.strict,
                                   max_fraction=data.max_skip_fraction)
  t, m = spec.seq_len, spec.images_per_sample
  it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct={"tokens": t, "targets": t, "loss_mask": t, "images": m},
      num_packing_bins=max(global_batch // pc, 1) if data.pack else 1, shuffle_bins=False,
      max_sequences_per_bin=None if data.pack else 1)
  it = it.map(_row_from_packed).batch(global_batch // pc, drop_remainder=True).map(collate)
  return iter(it)


def train_iterator(data: DataConfig, spec: RowSpec, *, global_batch: int, seed: int,
                   stats: skips.SkipStats | None = None) -> grain.DatasetIterator:
  """Endless, shuffled, checkpointable iterator over this process's share of the batch."""
  items, make = source_examples(data, spec, split="train")
  items = items.shuffle(seed=seed).repeat(None)
  return _iterator(items, make, data, spec, global_batch, stats or skips.SkipStats())


def eval_iterator(data: DataConfig, spec: RowSpec, *, global_batch: int,
                  stats: skips.SkipStats | None = None) -> grain.DatasetIterator:
  """One pass over the held-out split (the last partial batch is dropped), one sample per
  row: exact-match accuracy is scored per row (eval_step)."""
  data = dataclasses.replace(data, pack=False)
  items, make = source_examples(data, spec, split="eval")
  return _iterator(items, make, data, spec, global_batch, stats or skips.SkipStats())


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
