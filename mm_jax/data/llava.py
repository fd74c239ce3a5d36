"""The `llava_json` and `tfds` sources wired into the pipeline: records -> examples.

`tfds` reads the same JSON + media, converted once into ArrayRecord files under
`data.tfds_dir` (tensorflow-datasets, no TensorFlow), and then reads records at random.

`data.json` (JSON list or JSON Lines, LLaVA's format) with media under `data.image_dir`,
tokenised by `data.tokenizer` with `data.template`; each `<image>` tag expands into as many
placeholders as the vision tower yields, each `<video>` into `tokens_per_video`, each
`<audio>` into its own clip's count (clips differ in length). Videos give
`model.video.num_frames` uniformly sampled frames (`video.load_video`); audio files, or the
videos' audio tracks (sources.py's rule), give log-mel features cut to
`data.audio_seq_len` frames. Decoding runs inside grain workers.
"""

from __future__ import annotations

import grain
import numpy as np

from mm_jax.config import ConfigError, DataConfig
from mm_jax.data import audio, media, sources, templates, text, tfds_source, video
from mm_jax.data.errors import CORRUPT_AUDIO, CORRUPT_VIDEO, TAG_MISMATCH, BadRecord
from mm_jax.data.records import guarded, to_example
from mm_jax.data.text import AUDIO_TAG, IMAGE_TAG, VIDEO_TAG

_TAGS = {"image": IMAGE_TAG, "video": VIDEO_TAG, "audio": AUDIO_TAG}


def tokenizer_for(data: DataConfig, model):
  """Loads the tokenizer with a tag per modality and checks the model's placeholder ids.

  model: anything with `modalities` and `<m>_token_id` (ModelConfig, records.RowSpec).
  `<image>` is always registered, and first, so that tags missing from the vocabulary get
  the same ids (vocab, vocab + 1, ...) whichever of video and audio the model reads.
  """
  tags = [IMAGE_TAG] + [_TAGS[m] for m in ("video", "audio") if m in model.modalities]
  tok = text.load_tokenizer(data.tokenizer, tags=tags)
  for m in model.modalities:
    want, got = getattr(model, f"{m}_token_id"), tok.tag_id(_TAGS[m])
    if got != want:
      raise ConfigError(f"config.model.{m}_token_id: {want}, but the tokenizer {data.tokenizer} "
                        f"gives {_TAGS[m]} id {got}; set --config.model.{m}_token_id={got}")
  return tok


def _built_tfds(json_path: str, data: DataConfig) -> str:
  """Converts the JSON + media to ArrayRecord once (process 0; the others wait)."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_index() == 0:
    path = tfds_source.build(json_path, data.image_dir, data.tfds_dir)
  multihost_utils.sync_global_devices("mm_jax_tfds_build")
  if jax.process_index() != 0:
    path = tfds_source.build(json_path, data.image_dir, data.tfds_dir)  # reuses the build
  return path


def _load(file: sources.MediaFile, load, **kwargs):
  """load(file's bytes or path); a BadRecord about bytes names the file's path instead."""
  try:
    return load(file.source, **kwargs)
  except BadRecord as e:
    if file.data is None:
      raise
    detail = f"{file.path}: {e.detail.removeprefix('<bytes>: ')}"
    raise BadRecord(e.reason, e.record_id, detail) from e


def decode_av(sample: sources.Sample, spec, data: DataConfig
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The sample's videos uint8[F, S, S, 3] and log-mel clips float32[L_i, n_mels]."""
  for m, files in (("video", sample.videos), ("audio", sample.audios or sample.audio_from_video)):
    if files and m not in spec.modalities:  # before decoding anything
      raise BadRecord(TAG_MISMATCH, sample.id, f"has {m} but the model reads no {m} "
                      "(config.model.modalities)")
  videos, tracks = [], []
  for f in sample.videos:
    frames, track = _load(f, video.load_video, num_frames=spec.num_frames, size=spec.image_size,
                          with_audio=sample.audio_from_video, record_id=sample.id,
                          aspect=data.image_aspect_ratio, mean=spec.mean)
    videos.append(frames)
    tracks.append(track)
  files = sample.videos if sample.audio_from_video else sample.audios
  if not sample.audio_from_video:
    tracks = [_load(f, audio.load_audio, record_id=sample.id) for f in files]
  # Cut before the features, as WhisperFeatureExtractor cuts to 30 s before its own.
  mels = [audio.log_mel(w[:spec.audio_seq_len * audio.HOP], n_mels=spec.n_mels) for w in tracks]
  for f, mel in zip(files, mels, strict=True):
    if spec.audio_tokens(len(mel)) < 1:
      reason = CORRUPT_VIDEO if sample.audio_from_video else CORRUPT_AUDIO
      raise BadRecord(reason, sample.id, f"{f.path}: {len(mel)} log-mel frames, too short "
                      "for one audio token")
  return videos, mels


def llava_examples(data: DataConfig, spec, *, split: str):
  """(MapDataset of records, record -> example-or-marker)."""
  key = "json" if split == "train" else "eval_json"
  path = getattr(data, key)
  if not path:
    raise ConfigError("config.data.eval_json: required to evaluate a llava_json run")
  # An empty file would end the first pass at once: StopIteration deep in the loop.
  empty = ConfigError(f"config.data.{key}: {path} holds no records (an empty JSON list or "
                      "JSON Lines file); give it at least one")
  if data.source == "tfds":
    try:
      records = tfds_source.TfdsRecords(_built_tfds(path, data))
    except sources.NoRecords:
      raise empty from None
    parse = tfds_source.parse_tfds_record
  else:
    records = sources.LlavaJsonSource(path, data.image_dir)
    parse = lambda record: sources.parse_record(record, image_dir=data.image_dir)
  if not len(records):
    raise empty
  tok = tokenizer_for(data, spec)

  def make(record) -> dict:
    sample = parse(record)
    videos, mels = decode_av(sample, spec, data)
    images = [media.preprocess(im, size=spec.image_size, aspect=data.image_aspect_ratio,
                               mean=spec.mean, std=spec.std) for im in sample.images]
    expand = {tok.tag_id(IMAGE_TAG): spec.tokens_per_image}
    if "video" in spec.modalities:
      expand[spec.video_token_id] = spec.tokens_per_video
    if "audio" in spec.modalities:
      expand[spec.audio_token_id] = [spec.audio_tokens(len(m)) for m in mels]
    enc = templates.render_conversation(tok, sample.conversation, data.template, expand=expand)
    return to_example(sample.id, enc, images, spec, videos=videos, audios=mels)

  describe = lambda record: str(record.get("id", "?")) if isinstance(record, dict) else "?"
  return grain.MapDataset.source(records), guarded(make, describe)
