"""Records -> examples: the row contract every source's example maker writes to.

`RowSpec` (what the model needs from a row), `to_example` (encoded ids + media -> the
next-token example, truncated to data.seq_len) and `guarded` (a bad record becomes a skip
marker). The sources (data/synthetic*.py, data/llava.py, data/coco.py) build on this module
and data/pipeline.py builds on them, so the package reads one way:
sources -> records -> pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from mm_jax.config import DataConfig, ModelConfig
from mm_jax.data import media, skips
from mm_jax.data.errors import BadRecord
from mm_jax.data.text import Encoded


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """What the model needs from the pipeline: lengths, placeholder ids, media geometry."""

  seq_len: int
  images_per_sample: int
  image_token_id: int
  tokens_per_image: int
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  modalities: tuple[str, ...] = ("image",)
  videos_per_sample: int = 1
  num_frames: int = 1
  video_token_id: int = -1
  tokens_per_video: int = 0
  audios_per_sample: int = 1
  audio_seq_len: int = 1
  n_mels: int = 80
  audio_token_id: int = -1
  audio_pool: int = 1

  @classmethod
  def create(cls, data: DataConfig, model: ModelConfig) -> RowSpec:
    v = model.vision
    return cls(data.seq_len, data.images_per_sample, model.image_token_id, v.tokens_per_image,
               v.image_size, v.mean, v.std, model.modalities, data.videos_per_sample,
               model.video.num_frames, model.video_token_id, model.video.tokens_per_video(v),
               data.audios_per_sample, data.audio_seq_len, model.audio.n_mels,
               model.audio_token_id, model.audio.pool)

  def audio_tokens(self, n_frames: int) -> int:
    """Placeholders of a clip of `n_frames` log-mel frames (models/audio.tokens_for_frames)."""
    return ((n_frames + 1) // 2) // self.audio_pool

  def media(self) -> dict[str, tuple[str, int, int]]:
    """modality -> (batch key, slots per row, placeholder id), for this model's modalities."""
    table = {"image": ("images", self.images_per_sample, self.image_token_id),
             "video": ("video", self.videos_per_sample, self.video_token_id),
             "audio": ("audio", self.audios_per_sample, self.audio_token_id)}
    return {m: table[m] for m in self.modalities}


def _spans(tokens: np.ndarray, token_id: int, lengths: list[int]) -> list[tuple[int, int]]:
  """[start, end) of each media item: the k-th item owns the next lengths[k] placeholders."""
  where = np.flatnonzero(tokens == token_id)
  spans, k = [], 0
  for n in lengths:
    spans.append((int(where[k]), int(where[k + n - 1]) + 1))
    k += n
  return spans


def truncate(enc: Encoded, spans: dict[str, list[tuple[int, int]]], spec: RowSpec,
             record_id: str) -> tuple[Encoded, dict[str, int]]:
  """Fits an example into T + 1 ids: cuts text only, never inside a media item's placeholders.

  A cut that lands inside a media item's placeholder run moves to the start of that run
  and drops that item and every later one. Raises `too_long` when not even the first media
  item fits, or when nothing to learn (no loss token) remains. Returns the items kept per
  modality.
  """
  limit = spec.seq_len + 1
  kept = {m: len(s) for m, s in spans.items()}
  if len(enc.tokens) <= limit:
    return enc, kept
  items = [span for s in spans.values() for span in s]
  cut = min([limit] + [start for start, end in items if end > limit])
  kept = {m: sum(end <= cut for _, end in s) for m, s in spans.items()}
  if items and cut <= min(start for start, _ in items):
    raise BadRecord("too_long", record_id, f"its first media item alone needs more than "
                    f"data.seq_len={spec.seq_len} tokens")
  tokens, answer = enc.tokens[:cut], enc.answer[:cut]
  if not answer[1:].any():
    raise BadRecord("too_long", record_id, f"no answer token within data.seq_len="
                    f"{spec.seq_len} after truncation")
  return Encoded(tokens, answer), kept


def _pixels(images: list[np.ndarray], spec: RowSpec) -> np.ndarray:
  """uint8 or normalised float32 [..., S, S, 3] items -> float32, normalised."""
  return np.stack([im if im.dtype == np.float32 else media.normalise(im, spec.mean, spec.std)
                   for im in images]).astype(np.float32)


def to_example(record_id: str, enc: Encoded, images: list[np.ndarray], spec: RowSpec, *,
               videos: list[np.ndarray] = (), audios: list[np.ndarray] = (), kind: int = -1
               ) -> dict[str, np.ndarray]:
  """Encoded ids + media -> next-token example {tokens, targets, loss_mask, media...}.

  images: [S, S, 3] each; videos: [F, S, S, 3] each; audios: log-mel float32[L_i, n_mels]
  each (cut to data.audio_seq_len). The placeholders of each modality must number exactly
  what its items yield (tag_mismatch otherwise); `kind` labels the sample for per-kind eval.
  """
  audios = [a[:spec.audio_seq_len] for a in audios]
  items = {"image": list(images), "video": list(videos), "audio": audios}
  lengths = {"image": [spec.tokens_per_image] * len(images),
             "video": [spec.tokens_per_video] * len(videos),
             "audio": [spec.audio_tokens(len(a)) for a in audios]}
  media_spec = spec.media()
  spans = {}
  for m, got in items.items():
    token_id = media_spec[m][2] if m in media_spec else None
    found = int(np.sum(enc.tokens == token_id)) if token_id is not None else 0
    if got and m not in media_spec:
      raise BadRecord("tag_mismatch", record_id, f"{len(got)} {m} item(s) but the model "
                      f"reads no {m} (config.model.modalities)")
    if found != sum(lengths[m]) or (m == "audio" and 0 in lengths[m]):
      raise BadRecord("tag_mismatch", record_id, f"{found} {m} placeholder tokens but its "
                      f"{len(got)} item(s) need {sum(lengths[m])}")
    if m in media_spec:
      spans[m] = _spans(enc.tokens, token_id, lengths[m])
  enc, kept = truncate(enc, spans, spec, record_id)
  for m, (_, slots, _) in media_spec.items():
    if kept[m] > slots:
      reason = "too_many_images" if m == "image" else "too_many_media"
      raise BadRecord(reason, record_id, f"{kept[m]} {m} items > {slots} slots per sample "
                      f"(data.{m}s_per_sample)")
  out = {"tokens": enc.tokens[:-1], "targets": enc.tokens[1:], "loss_mask": enc.answer[1:],
         "kind": np.array([kind], np.int32)}
  s = spec.image_size
  if "image" in media_spec:
    out["images"] = (_pixels(images[:kept["image"]], spec) if kept["image"]
                     else np.zeros((0, s, s, 3), np.float32))
  if "video" in media_spec:
    out["video"] = (_pixels(videos[:kept["video"]], spec) if kept["video"]
                    else np.zeros((0, spec.num_frames, s, s, 3), np.float32))
  if "audio" in media_spec:
    clips = audios[:kept["audio"]]
    out["audio"] = np.zeros((len(clips), spec.audio_seq_len, spec.n_mels), np.float32)
    for i, a in enumerate(clips):
      out["audio"][i, :len(a)] = a
    out["audio_frames"] = np.array([len(a) for a in clips], np.int32)
  return out


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
