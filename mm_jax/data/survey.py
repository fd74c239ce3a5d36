"""One pass over a data set through the run's own pipeline, watched: what `check` reports.

`survey` builds the configured source with `pipeline.source_examples` and feeds it through
`pipeline.batch_iterator` (grain read threads, the skip filter, the first-fit packer, batches),
exactly as a training run does, with one difference: the example maker is wrapped by
`_Watch`, which notes each sample's outcome (its skip reason, or its placeholders and
media items) on the way past. So a record is skipped here iff the run would skip it.

A sample's length before truncation is not visible in its example (`records.truncate`
cut it already). For the samples that may have been cut (a row within one media item's
placeholders of data.seq_len: a cut never splits an item, it moves to the item's start)
or were refused (too_long, too_many_*), `_Watch` runs the source's maker a second time
with a RowSpec of unlimited length and slots, which only `truncate` and the slot check
read: same records, same decoding, the full length.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable

import grain
import numpy as np

from mm_jax.config import Config, ConfigError
from mm_jax.data import pipeline, skips, sources
from mm_jax.data.errors import TOO_LONG
from mm_jax.data.records import RowSpec

_UNLIMITED = 2**31 - 1
# Reasons whose record rendered fine: its full length is worth reporting.
_MEASURED = (TOO_LONG, "too_many_images", "too_many_media")


@dataclasses.dataclass
class Survey:
  """What one pass saw. lengths: row positions per rendered sample before truncation (a
  sample of n ids takes n - 1 positions, the unit of data.seq_len)."""

  stats: skips.SkipStats = dataclasses.field(default_factory=skips.SkipStats)
  first: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> message
  lengths: list[int] = dataclasses.field(default_factory=list)
  truncated: int = 0
  too_long: int = 0
  placeholders: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  items: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  files: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # found, missing
  rows: int = 0
  tokens_used: int = 0
  slots_used: dict[str, int] = dataclasses.field(default_factory=dict)


class _Watch:
  """The source's example maker, noting each outcome into a Survey (grain's read threads
  call it, hence the lock)."""

  def __init__(self, make: Callable, measure: Callable, spec: RowSpec, out: Survey):
    self.make, self.measure, self.spec, self.out = make, measure, spec, out
    self.lock = threading.Lock()
    # A cut lands at most one item's placeholders before seq_len + 1 ids (records.truncate).
    longest = {"image": spec.tokens_per_image, "video": spec.tokens_per_video,
               "audio": spec.audio_tokens(spec.audio_seq_len)}
    self.near = spec.seq_len + 1 - max([1] + [longest[m] for m in spec.media()])

  def __call__(self, item) -> dict:
    ex = self.make(item)
    if skips.SKIP in ex:
      with self.lock:
        self.out.first.setdefault(ex[skips.SKIP], ex["message"])
      if ex[skips.SKIP] in _MEASURED:
        self._note(self.measure(item), refused=ex[skips.SKIP] == TOO_LONG)
      return ex
    cut = len(ex["tokens"]) >= self.near  # may have lost tokens; measure it
    self._note(self.measure(item) if cut else ex, truncated=cut)
    return ex

  def _note(self, full: dict, *, refused: bool = False, truncated: bool = False) -> None:
    if skips.SKIP in full:  # cannot happen for a record that rendered once; count nothing
      return
    n, out = len(full["tokens"]), self.out
    ids = np.concatenate([full["tokens"], full["targets"][-1:]])  # the sample's n + 1 ids
    with self.lock:
      out.lengths.append(n)
      out.too_long += n > self.spec.seq_len and refused
      out.truncated += n > self.spec.seq_len and truncated
      for m, (key, _, token_id) in self.spec.media().items():
        out.placeholders.setdefault(m, []).append(int(np.sum(ids == token_id)))
        out.items.setdefault(m, []).append(len(full[key]))


def _measure(cfg: Config, spec: RowSpec, split: str) -> Callable:
  """The source's maker under unlimited length and slots, built on first use (a second
  read of the records: only samples near data.seq_len need it)."""
  unlimited = dataclasses.replace(spec, seq_len=_UNLIMITED, images_per_sample=_UNLIMITED,
                                  videos_per_sample=_UNLIMITED, audios_per_sample=_UNLIMITED)
  lock, made = threading.Lock(), []

  def measure(item) -> dict:
    with lock:
      if not made:
        made.append(pipeline.source_examples(cfg.data, unlimited, split=split)[1])
    return made[0](item)

  return measure


def references(item, image_dir: str) -> dict[str, list[str]]:
  """Media paths a raw item names: a llava_json record, or a coco_captions (epoch, unit)."""
  if isinstance(item, tuple) and isinstance(item[1], dict) and "file" in item[1]:
    return {"image": [os.path.join(image_dir, item[1]["file"])]}
  if not isinstance(item, dict) or sources.ERROR_KEY in item:
    return {}
  try:
    paths = sources.media_paths(item, sources.record_id(item))
  except Exception:  # noqa: BLE001 - a malformed field: the pass counts it as a skip
    return {}
  return {m: [os.path.join(image_dir, p) for p in ps] for m, ps in paths.items() if ps}


def count_files(items: grain.MapDataset, image_dir: str) -> dict[str, tuple[int, int]]:
  """modality -> (found, missing) distinct files the items reference (a stat each, no read)."""
  named: dict[str, set[str]] = {}
  for i in range(len(items)):
    for m, paths in references(items[i], image_dir).items():
      named.setdefault(m, set()).update(paths)
  found = {m: sum(map(os.path.isfile, ps)) for m, ps in sorted(named.items())}
  return {m: (n, len(named[m]) - n) for m, n in found.items()}


def open_source(cfg: Config, spec: RowSpec, split: str, limit: int
                ) -> tuple[grain.MapDataset, Callable]:
  """The split's first `limit` items (0: all) and its maker. A missing file or folder, or
  an empty source, is a ConfigError naming the key that points at it."""
  key = "json" if split == "train" else "eval_json"
  path = getattr(cfg.data, key)
  if not cfg.data.embedded:
    if path and not os.path.isfile(path):
      raise ConfigError(f"config.data.{key}: no file {path}")
    if not os.path.isdir(cfg.data.image_dir):
      raise ConfigError(f"config.data.image_dir: no folder {cfg.data.image_dir}")
  items, make = pipeline.source_examples(cfg.data, spec, split=split)
  if limit:
    items = items[:limit]
  if not len(items):
    raise ConfigError(f"config.data.{key}: {path} holds no records")
  return items, make


def survey(cfg: Config, spec: RowSpec, split: str, items: grain.MapDataset,
           make: Callable) -> Survey:
  """Reads `items` (open_source's) as the run would; see the module doc."""
  out = Survey()
  if not cfg.data.embedded and cfg.data.source != "tfds":
    out.files = count_files(items, cfg.data.image_dir)
  data = cfg.data if split == "train" else dataclasses.replace(cfg.data, pack=False)
  if split == "train" and not (data.source == "synthetic_av" and data.curriculum_samples):
    items = items.shuffle(seed=cfg.train.seed)  # the packer sees the run's order
  # Count every record instead of stopping (the verdict is the caller's), and decode in
  # this process so that _Watch's notes land here.
  data = dataclasses.replace(data, strict=False, max_skip_fraction=1.0, worker_count=0)
  watch = _Watch(make, _measure(cfg, spec, split), spec, out)
  batches = pipeline.batch_iterator(items, watch, data, spec, cfg.train.batch_size, out.stats,
                               with_kind=split != "train", drop_remainder=False)
  for batch in batches:
    out.rows += len(batch["tokens"])
    out.tokens_used += int((batch["segment_ids"] > 0).sum())
    for m, (key, _, _) in spec.media().items():
      valid = pipeline.MEDIA_VALID[key]
      out.slots_used[m] = out.slots_used.get(m, 0) + int(batch[valid].sum())
  return out
