"""Samples -> examples -> packed rows -> batches, through grain, one shard per JAX process.

Every batch is a dict of numpy arrays with DESIGN.md's keys and static shapes:
tokens/targets/loss_mask/segment_ids/positions [B, T]; per modality the model reads
(config.model.modalities), items in order of appearance, Mi/Mv/Ma slots per row:
  images float32[B*Mi, S, S, 3], image_valid bool[B*Mi]
  video float32[B*Mv, F, S, S, 3], video_valid bool[B*Mv]
  audio float32[B*Ma, L, n_mels] (log-mel, zero past each clip's end), audio_valid
  bool[B*Ma], audio_frames int32[B*Ma] (valid log-mel frames of each clip)
Eval batches also carry kind int32[B, 1] (the sample's question kind, -1 if none) and
row_valid bool[B] (False: a padding row, which counts toward nothing; eval_iterator).
Stages:

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
import itertools
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np
from absl import flags

from mm_jax.config import DataConfig
from mm_jax.data import audio, coco, llava, skips, synthetic, synthetic_av
from mm_jax.data.records import RowSpec, guarded, to_example, truncate  # noqa: F401 (re-exported)
from mm_jax.data.text import AUDIO_TAG, VIDEO_TAG, WordTokenizer, render
from mm_jax.timeslots import audio_slots


def synthetic_tokenizer() -> WordTokenizer:
  return WordTokenizer(synthetic.WORDS)


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
    return to_example(sample["id"], enc, [sample["image"]], spec,
                      kind=synthetic.KINDS.index(sample["kind"]))

  return grain.MapDataset.range(n), guarded(make, lambda i: f"synthetic-{split}-{i}")


def av_tokenizer() -> WordTokenizer:
  return WordTokenizer(synthetic_av.WORDS)


def synthetic_av_examples(data: DataConfig, spec: RowSpec, *, split: str
                          ) -> tuple[grain.MapDataset, Callable]:
  """The embedded audio-video task: frames as a video item, log-mel of the clip as audio.
  Eval samples ask one question each (per-kind accuracy is exact match on it); train
  samples up to `data.turns`, and the first `data.curriculum_samples` of them only the
  questions labelled in `data.curriculum`."""
  tokenizer = av_tokenizer()
  n, turns = (data.num_train, data.turns) if split == "train" else (data.num_eval, 1)

  def make(index) -> dict[str, np.ndarray]:
    early = split == "train" and index < data.curriculum_samples
    sample = synthetic_av.example(int(index), split=split, seed=data.seed,
                                  frame_size=spec.image_size, num_frames=spec.num_frames,
                                  clip_seconds=data.clip_seconds, turns=turns,
                                  only=data.curriculum if early else ())
    mel = audio.log_mel(sample["waveform"], n_mels=spec.n_mels)[:spec.audio_seq_len]
    words, tags = av_tags(sample["prompt"], spec, [spec.audio_tokens(len(mel))],
                          interleave=data.interleave_av)
    enc = render(tokenizer, words, sample["answer"], tags=tags, turns=sample["turns"])
    return to_example(sample["id"], enc, [], spec, videos=[sample["frames"]], audios=[mel],
                      kind=synthetic_av.LABELS.index(synthetic_av.label(sample)))

  return grain.MapDataset.range(n), guarded(make, lambda i: f"synthetic_av-{split}-{i}")


def av_tags(words: list[str], spec: RowSpec, audio_tokens: list[int], *, interleave: bool
            ) -> tuple[list[str], dict[str, tuple[int, int | list[int]]]]:
  """Prompt words and tag expansions for video and audio placeholders.

  interleave: a `<video> <audio>` pair becomes F (frame, audio slot) pairs, frame f's
  placeholders followed by the audio tokens of the same 1/F of the clip (as Qwen2.5-Omni
  interleaves by time): what happens at one time sits close in the sequence. The merge
  rule is unchanged (the k-th placeholder of a modality takes its k-th row), so only the
  order of placeholders differs.
  """
  video = (spec.video_token_id, spec.tokens_per_video)
  tags = {VIDEO_TAG: video, AUDIO_TAG: (spec.audio_token_id, list(audio_tokens))}
  pair = [VIDEO_TAG, AUDIO_TAG]
  if not interleave or len(audio_tokens) != 1 or words[:2] != pair:
    return words, tags
  f, n = spec.num_frames, audio_tokens[0]
  # Audio tokens per slot as the time codes count them (mm_jax/timeslots.py).
  per_slot = np.bincount(audio_slots(np.arange(n), n, f), minlength=f)
  tags = {VIDEO_TAG: (video[0], video[1] // f),
          AUDIO_TAG: (spec.audio_token_id, [int(c) for c in per_slot])}
  return pair * f + words[2:], tags


def kind_names(data: DataConfig) -> tuple[str, ...]:
  """Names of the `kind` labels a source gives its samples (per-kind eval accuracy). A name
  "kind/question" is one question of a kind: eval reports it and the kind's total."""
  return {"synthetic": synthetic.KINDS, "synthetic_av": synthetic_av.LABELS}.get(data.source, ())


def source_examples(data: DataConfig, spec: RowSpec, *, split: str):
  """(MapDataset of raw items, item -> example-or-marker) for the configured source."""
  if data.source == "synthetic":
    return synthetic_examples(data, spec, split=split)
  if data.source == "synthetic_av":
    return synthetic_av_examples(data, spec, split=split)
  if data.source == "coco_captions":
    return coco.coco_examples(data, spec, split=split)
  return llava.llava_examples(data, spec, split=split)


# ----------------------------------------------------------------------------- batches


_MEDIA_KEYS = ("images", "image_valid", "video", "video_valid", "audio", "audio_valid",
               "audio_frames")
MEDIA_VALID = {"images": "image_valid", "video": "video_valid", "audio": "audio_valid"}


def collate(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's stacked rows -> batch: media items flattened to [B*M, ...]."""
  out = dict(rows)
  for key in _MEDIA_KEYS:
    if key in rows:
      out[key] = rows[key].reshape((-1,) + rows[key].shape[2:])
  return out


def _length_struct(spec: RowSpec, with_kind: bool) -> dict[str, int]:
  t = spec.seq_len
  out = {"tokens": t, "targets": t, "loss_mask": t}
  for m, (key, slots, _) in spec.media().items():
    out[key] = slots
    if m == "audio":
      out["audio_frames"] = slots
  if with_kind:
    out["kind"] = 1
  return out


def _row_from_packed(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  row = {"tokens": p["tokens"], "targets": p["targets"],
         "loss_mask": p["loss_mask"].astype(bool), "segment_ids": p["tokens_segment_ids"],
         "positions": p["tokens_positions"]}
  for key, valid in MEDIA_VALID.items():
    if key in p:
      row[key], row[valid] = p[key], p[f"{key}_segment_ids"] > 0
  for key in ("audio_frames", "kind"):
    if key in p:
      row[key] = p[key]
  return row


def read_threads(data: DataConfig) -> int:
  """grain read threads: `data.read_threads`, or for -1 one thread for the synthetic sources
  (small numpy calls that hold the GIL; config/run.py) and grain's 16 for decoders."""
  if data.read_threads >= 0:
    return data.read_threads
  return 1 if data.embedded else 16


def batch_iterator(items: grain.MapDataset, make: Callable, data: DataConfig, spec: RowSpec,
                   global_batch: int, stats: skips.SkipStats, *, with_kind: bool = False,
                   drop_remainder: bool = True) -> grain.DatasetIterator:
  """Records -> this process's packed batches: read threads, the skip filter, the packer
  (train_iterator, eval_iterator and data/survey.py's check all go through here)."""
  pc, pi = jax.process_count(), jax.process_index()
  if global_batch % pc:
    raise ValueError(f"config.train.batch_size {global_batch} not divisible by {pc} processes")
  # Each process reads only its own items.
  options = grain.ReadOptions(num_threads=read_threads(data))
  it = items[pi::pc].map(make).to_iter_dataset(options)
  if data.worker_count > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (library use, tests)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
  it = skips.SkipFilterIterDataset(it, stats, strict=data.strict,
                                   max_fraction=data.max_skip_fraction)
  if not with_kind:  # `kind` (one per sample) would cap a packed row at one sample
    it = it.map(lambda ex: {k: v for k, v in ex.items() if k != "kind"})
  it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct=_length_struct(spec, with_kind),
      num_packing_bins=max(global_batch // pc, 1) if data.pack else 1, shuffle_bins=False,
      max_sequences_per_bin=None if data.pack else 1)
  it = it.map(_row_from_packed).batch(global_batch // pc, drop_remainder=drop_remainder)
  return iter(it.map(collate))


def train_iterator(data: DataConfig, spec: RowSpec, *, global_batch: int, seed: int,
                   stats: skips.SkipStats | None = None) -> grain.DatasetIterator:
  """Endless, shuffled, checkpointable iterator over this process's share of the batch.

  A curriculum (synthetic_av) keeps the order instead: its samples are independent draws
  already, and sample i must be the i-th read for "the first curriculum_samples" to mean
  the first steps (and again at the start of each pass over data.num_train)."""
  items, make = source_examples(data, spec, split="train")
  if not (data.source == "synthetic_av" and data.curriculum_samples):
    items = items.shuffle(seed=seed)
  items = items.repeat(None)
  return batch_iterator(items, make, data, spec, global_batch, stats or skips.SkipStats())


def eval_iterator(data: DataConfig, spec: RowSpec, *, global_batch: int,
                  stats: skips.SkipStats | None = None, max_batches: int = 0
                  ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the whole held-out split, one sample per row: exact-match accuracy is
  scored per row (eval_step).

  Every process yields the same eval_steps() batches, at most `max_batches` (> 0), since
  each eval step is a collective: the last partial batch is topped up with padding rows
  (padding_rows), and a process whose share runs out sooner (skipped records, a smaller
  `items[pi::pc]`) yields whole padding batches. Shapes stay those of a full batch.
  """
  data = dataclasses.replace(data, pack=False)
  items, make = source_examples(data, spec, split="eval")
  it = batch_iterator(items, make, data, spec, global_batch, stats or skips.SkipStats(),
                 with_kind=True, drop_remainder=False)
  steps = eval_steps(len(items), global_batch, jax.process_count())
  if max_batches:
    steps = min(steps, max_batches)
  return _padded(it, steps, padding_rows(spec, global_batch // jax.process_count()))


def eval_steps(records: int, global_batch: int, processes: int) -> int:
  """Eval batches that score every record: enough for the largest process share
  (`items[pi::pc]` holds at most ceil(records / pc)), the same on every process."""
  share = -(-records // processes)
  return -(-share // (global_batch // processes))


def padding_rows(spec: RowSpec, rows: int) -> dict[str, np.ndarray]:
  """`rows` eval rows that count toward nothing: no loss token (so no loss, no answer), no
  valid media, kind -1, row_valid False; zeros elsewhere (segment 0, as a packed row's
  padding tail). Shapes and dtypes are an eval batch's of `rows` rows."""
  out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in batch_shapes(spec, rows).items()}
  return {**out, "kind": np.full((rows, 1), -1, np.int32), "row_valid": np.zeros(rows, bool)}


def _padded(batches: Iterator[dict], steps: int, pad: dict[str, np.ndarray]
            ) -> Iterator[dict[str, np.ndarray]]:
  """`steps` batches of `batches`, each topped up from `pad`, then whole `pad` batches."""
  rows = len(pad["tokens"])
  for local in itertools.islice(itertools.chain(batches, itertools.repeat(None)), steps):
    if local is None:
      yield dict(pad)  # a copy: callers pop keys
      continue
    n = len(local["tokens"])
    local = {**local, "row_valid": np.ones(n, bool)}
    if n < rows:  # a key with M items per row ([B*M, ...] media) takes M per padding row
      local = {k: np.concatenate([v, pad[k][:len(pad[k]) // rows * (rows - n)]])
               for k, v in local.items()}
    yield local


def global_batch(local: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays laid out by `shardings`."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def batch_shapes(spec: RowSpec, batch: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Global shapes and dtypes of every training batch key (for abstract compilation)."""
  t, s = spec.seq_len, spec.image_size
  out = {"tokens": ((batch, t), np.int32), "targets": ((batch, t), np.int32),
         "loss_mask": ((batch, t), np.bool_), "segment_ids": ((batch, t), np.int32),
         "positions": ((batch, t), np.int32)}
  media = spec.media()
  if "image" in media:
    m = batch * spec.images_per_sample
    out.update(images=((m, s, s, 3), np.float32), image_valid=((m,), np.bool_))
  if "video" in media:
    m = batch * spec.videos_per_sample
    out.update(video=((m, spec.num_frames, s, s, 3), np.float32),
               video_valid=((m,), np.bool_))
  if "audio" in media:
    m = batch * spec.audios_per_sample
    out.update(audio=((m, spec.audio_seq_len, spec.n_mels), np.float32),
               audio_valid=((m,), np.bool_), audio_frames=((m,), np.int32))
  return out
