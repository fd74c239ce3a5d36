"""The `tfds` source: a LLaVA JSON / JSONL file + image folder, converted once to ArrayRecord.

`build` runs a tensorflow-datasets builder that writes one example per JSON record (in tfds'
fixed hashed order; ids are those of the JSON), with the raw image, video and audio file
bytes, not pixels or samples, so that conversion decodes nothing; `TfdsRecords` then serves
the examples at random through `tfds.core.DatasetBuilder.as_data_source` (ArrayRecord, no
TensorFlow) for grain, and `parse_tfds_record` decodes and validates one, like
`sources.parse_record`, inside the grain workers.

A record that is already broken at conversion time (an unreadable media field, a missing
media file, a `read_records` placeholder, a bad conversation, a tag mismatch) is still
written, with `error` = "reason: detail", so that skipping and counting happen once, at
training time, by the pipeline's one skip path. Corrupt media bytes surface at decode.

Everything here must import and run without TensorFlow. Image bytes are a sequence of
`Tensor(shape=(), dtype=object)`, not of `Image`: that feature calls TF when fed arrays and
hands back PIL-decoded pixels, without `media.decode_image`'s EXIF and alpha rules.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mm_jax.data import sources
from mm_jax.data.errors import (
  BAD_JSON,
  MISSING_AUDIO,
  MISSING_IMAGE,
  MISSING_VIDEO,
  REASONS,
  BadRecord,
)
from mm_jax.data.media import decode_image

# Bump when the features or their meaning change: tfds reuses any directory of this version.
# 1.1.0: videos and audios (issue 7).
BUILDER_VERSION = "1.1.0"
# modality -> (bytes field, paths field, reason when a file is missing)
_FIELDS = {"image": ("images", "image_paths", MISSING_IMAGE),
           "video": ("videos", "video_paths", MISSING_VIDEO),
           "audio": ("audios", "audio_paths", MISSING_AUDIO)}
SPLIT = "train"
# Long enough that two different inputs never share a directory in practice.
_FINGERPRINT_CHARS = 16


def features() -> tfds.features.FeaturesDict:
  """The example layout; every field encodes and decodes without TensorFlow."""
  text = tfds.features.Text()
  blobs = {f: tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
           for f, _, _ in _FIELDS.values()}
  paths = {f: tfds.features.Sequence(text) for _, f, _ in _FIELDS.values()}
  return tfds.features.FeaturesDict({
    "id": text,
    "conversations": text,  # json.dumps of the record's `conversations`, as it was
    **blobs, **paths,  # file bytes and the paths as the record gave them, per modality
    "error": text,  # "" or "reason: detail"
  })


# ----------------------------------------------------------------------------- building


def build(json_path: str, image_dir: str, data_dir: str, *, name: str = "llava_records") -> str:
  """Converts `json_path` + `image_dir` to ArrayRecord under data_dir; returns its directory.

  The directory is `data_dir/name/<fingerprint>/BUILDER_VERSION`, the fingerprint hashing the JSON
  bytes and the absolute image_dir, so a changed file or another image folder never reuses
  stale examples. An existing complete build is reused as is (tfds writes into an
  `incomplete.*` directory and renames it at the end, so a crash leaves nothing to reuse).
  Pass the result to `TfdsRecords`.
  """
  config = fingerprint(json_path, image_dir)
  builder_cls = _builder_class(json_path, image_dir, name, config)
  builder = builder_cls(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def fingerprint(json_path: str, image_dir: str) -> str:
  """Short hex digest of the JSON file's bytes and the absolute image folder path."""
  with open(json_path, "rb") as f:
    digest = hashlib.file_digest(f, "sha256")
  digest.update(b"\0" + os.path.abspath(image_dir).encode())
  return digest.hexdigest()[:_FINGERPRINT_CHARS]


def _builder_class(json_path: str, image_dir: str, builder_name: str, config: str) -> type:
  """A builder class bound to one input, created per call and kept out of tfds' registry.

  Registering would make a second class of the same name raise, and the registry is not
  needed: readers open the directory that `build` returns.
  """
  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = builder_name
    VERSION = tfds.core.Version(BUILDER_VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)]
    # No code folder to look for checksums in. tfds' own code_path would evaluate
    # importlib_resources.abc (a lazy import of a package tfds only requires on Python < 3.9)
    # for any builder defined inside a package, and fail with ModuleNotFoundError.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
      # Not dataset_info_from_configs: that reads metadata files from this module's folder.
      # Shuffling stays on (examples land in key-hash order, the same on every build): with
      # disable_shuffling, tfds puts every small int key into one of its 1000 spill buckets
      # and sorts that bucket in memory, i.e. the whole data set once it exceeds 1 GB.
      return tfds.core.DatasetInfo(builder=self, features=features(),
                                   description=f"LLaVA records of {json_path}")

    def _split_generators(self, dl_manager):
      return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
      records = sources.read_records(json_path)
      if not records:  # tfds would fail later with a bare AssertionError
        raise sources.NoRecords(f"{json_path}: no records to convert")
      for i, record in enumerate(records):
        yield i, to_example(record, i, image_dir)

  return Builder


def to_example(record: dict, index: int, image_dir: str) -> dict:
  """One JSON record -> one tfds example; a broken record keeps its reason in `error`."""
  rid = sources.record_id(record, index)
  given = _paths_as_given(record, rid)
  example = {"id": rid, "error": "",
             "conversations": json.dumps(record.get("conversations"), ensure_ascii=False)}
  for m, (blobs, paths, _) in _FIELDS.items():
    example.update({blobs: [], paths: given[m]})
  try:
    checked = _checked_paths(record, rid)
    files = {m: [_read(os.path.join(image_dir, p), _FIELDS[m][2], rid) for p in checked[m]]
             for m in _FIELDS}
  except BadRecord as e:
    example["error"] = f"{e.reason}: {e.detail}"
  else:
    example.update({_FIELDS[m][0]: files[m] for m in _FIELDS})
  return example


def _paths_as_given(record: dict, rid: str) -> dict[str, list[str]]:
  """The media paths even of a record that fails other checks (for messages), else []."""
  try:
    return sources.media_paths(record, rid)
  except BadRecord:
    return {m: [] for m in _FIELDS}


def _checked_paths(record: dict, rid: str) -> dict[str, list[str]]:
  """The record's media paths after parse_record's checks (in its order), bar decoding."""
  if sources.ERROR_KEY in record:
    raise sources._stored_error(record[sources.ERROR_KEY], rid)
  conversation = sources._conversation(record.get("conversations"), rid)
  paths = sources.media_paths(record, rid)
  sources.check_tags(conversation, paths, rid)
  return paths


def _read(path: str, reason: str, rid: str) -> bytes:
  """The file's bytes, or BadRecord(missing_*) worded like media.decode_image's."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise BadRecord(reason, rid, f"{path}: {e.strerror}") from e


# ----------------------------------------------------------------------------- reading


class TfdsRecords:
  """grain RandomAccessDataSource over one split of a directory that `build` returned.

  `records[i]` is a dict with str `id`, `conversations` (JSON text) and `error`, list[str]
  `image_paths` / `video_paths` / `audio_paths` and list[bytes] `images` / `videos` /
  `audios`; `parse_tfds_record` turns it into a Sample.
  Pickles as its path (grain sends sources to worker processes), reopening on arrival.
  """

  def __init__(self, path: str, split: str = SPLIT):
    self.path = os.fspath(path)
    self.split = split
    # builder_from_directory rather than tfds.data_source(name): that looks the name up in
    # tfds' registry first, so a name shared with a catalog dataset would open that one.
    builder = tfds.builder_from_directory(self.path)
    self._source = builder.as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict:
    n = len(self)
    index = operator.index(index)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {n} records")
    return _plain(self._source[index % n])

  def __getstate__(self) -> dict:
    return {"path": self.path, "split": self.split}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["path"], state["split"])

  def __repr__(self) -> str:
    return f"TfdsRecords(path={self.path!r}, split={self.split!r}, len={len(self)})"


def _plain(example: dict) -> dict:
  """tfds' decoded example (Text comes back as bytes) -> str fields and plain lists."""
  out = {"id": _text(example["id"]), "conversations": _text(example["conversations"]),
         "error": _text(example["error"])}
  for blobs, paths, _ in _FIELDS.values():
    out[paths] = [_text(p) for p in example[paths]]
    out[blobs] = [bytes(b) for b in example[blobs]]
  return out


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def parse_tfds_record(record: dict) -> sources.Sample:
  """Validates one TfdsRecords record (or a raw tfds example) and decodes its images.

  Raises BadRecord: the stored conversion-time error with its reason; bad_conversation and
  tag_mismatch as `sources.parse_record`; corrupt_image naming the original path. Videos
  and audio come back as MediaFile(path, bytes), decoded later like parse_record's.
  """
  rid = _text(record["id"])
  error = _text(record.get("error", ""))
  if error:
    raise _stored(error, rid)
  conversation = sources._conversation(json.loads(_text(record["conversations"])), rid)
  paths = {m: [_text(p) for p in record.get(f, ())] for m, (_, f, _) in _FIELDS.items()}
  from_video = sources.check_tags(conversation, paths, rid)
  blobs = {m: [bytes(b) for b in record.get(f, ())] for m, (f, _, _) in _FIELDS.items()}
  images = [_decode(data, path, rid)
            for data, path in zip(blobs["image"], paths["image"], strict=True)]
  files = {m: tuple(sources.MediaFile(p, d) for d, p in zip(blobs[m], paths[m], strict=True))
           for m in ("video", "audio")}
  return sources.Sample(rid, images, conversation, files["video"], files["audio"], from_video)


def _stored(error: str, rid: str) -> BadRecord:
  """The stored `reason: detail` -> BadRecord; text of another shape counts as bad_json."""
  reason, _, detail = error.partition(": ")
  if reason in REASONS:
    return BadRecord(reason, rid, detail)
  return BadRecord(BAD_JSON, rid, error)


def _decode(data: Any, path: str, rid: str) -> np.ndarray:
  try:
    return decode_image(bytes(data), record_id=rid)
  except BadRecord as e:
    # decode_image only knows it had bytes; the path is what a person can go and look at.
    raise BadRecord(e.reason, rid, f"{path}: {e.detail.removeprefix('<bytes>: ')}") from e
