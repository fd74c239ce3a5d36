"""The `llava_json` source: LLaVA-format records (JSON list or JSON Lines) plus an image folder.

A record is `{"id": ..., "image": "rel/path.jpg" | ["a.jpg", ...] (optional),
"conversations": [{"from": "human" | "gpt", "value": "... <image> ..."}, ...]}`, and, for
MIMO models, `"video"` and `"audio"` (or `"audios"`, as Megatron's MIMO example writes it),
each a path or a list of paths, with `<video>` / `<audio>` tags. Media paths are relative
to the one media folder (`data.image_dir`); absolute paths work too. Each modality's tags
over all turns must number its files (tag_mismatch otherwise), with one rule for sound:
a record with `<audio>` tags, no audio files and at least one video takes the audio track
of each of its videos, in order (so its `<audio>` tags must number its videos).
`LlavaJsonSource` serves the raw record dicts (cheap, grain's random-access protocol);
`parse_record` validates one and decodes its images (videos and audio are decoded later,
by `llava.py`, which knows the frame count and mel bins), and is meant to run inside the grain
worker processes so that JPEG decoding never stalls the train step. Broken records raise
`BadRecord` with a countable reason so the pipeline can skip them.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
from typing import Any

import numpy as np

from mm_jax.data.errors import (
  BAD_CONVERSATION,
  BAD_JSON,
  MISSING_AUDIO,
  MISSING_IMAGE,
  MISSING_VIDEO,
  NOT_UTF8,
  TAG_MISMATCH,
  BadRecord,
)
from mm_jax.data.media import decode_image
from mm_jax.data.text import AUDIO_TAG, IMAGE_TAG, VIDEO_TAG

ROLES = ("human", "gpt")
ERROR_KEY = "_error"


@dataclasses.dataclass(frozen=True)
class MediaFile:
  """A video or audio file still to decode: its path, and its bytes when already read (tfds)."""

  path: str
  data: bytes | None = None

  @property
  def source(self) -> bytes | str:
    return self.path if self.data is None else self.data


@dataclasses.dataclass(frozen=True)
class Sample:
  """One validated record: uint8[H, W, 3] images in tag order and (role, text) turns; video
  and audio files in tag order; `audio_from_video`: the `<audio>` tags take the videos'
  audio tracks (then `audios` is empty)."""

  id: str
  images: list[np.ndarray]
  conversation: list[tuple[str, str]]
  videos: tuple[MediaFile, ...] = ()
  audios: tuple[MediaFile, ...] = ()
  audio_from_video: bool = False


class NoRecords(ValueError):
  """A records file with none to convert (tfds_source.build)."""


def read_records(path: str) -> list[dict]:
  """All records of a `.json` (one list) or `.jsonl` (one object per line) file.

  A bad JSONL line becomes a placeholder `{"id": "<file>:line<n>", "_error": BadRecord}`
  (reason bad_json or not_utf8) so one line cannot abort a run; a `.json` file that does
  not parse is unusable as a whole and raises ValueError with the position.
  """
  ext = os.path.splitext(path)[1].lower()
  if ext == ".jsonl":
    return _read_jsonl(path)
  if ext == ".json":
    return _read_json_list(path)
  raise ValueError(f"{path}: unknown records format {ext!r}; expected .json or .jsonl")


def _placeholder(record_id: str, reason: str, detail: str) -> dict:
  return {"id": record_id, ERROR_KEY: BadRecord(reason, record_id, detail)}


def _read_jsonl(path: str) -> list[dict]:
  base = os.path.basename(path)
  records = []
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      if n == 1:
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 BOM, which json.loads rejects.
      if raw.strip():
        records.append(_parse_jsonl_line(raw, f"{base}:line{n}"))
  return records


def _parse_jsonl_line(raw: bytes, record_id: str) -> dict:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return _placeholder(record_id, NOT_UTF8, f"invalid UTF-8 byte at offset {e.start}")
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    return _placeholder(record_id, BAD_JSON, f"{e.msg} at column {e.colno}")
  if not isinstance(record, dict):
    return _placeholder(record_id, BAD_JSON, f"expected an object, got {type(record).__name__}")
  return record


def _read_json_list(path: str) -> list[dict]:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 (invalid byte at offset {e.start})") from e
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
  base = os.path.basename(path)
  return [r if isinstance(r, dict) else
          _placeholder(f"{base}:item{i}", BAD_JSON, f"expected an object, got {type(r).__name__}")
          for i, r in enumerate(data)]


class LlavaJsonSource:
  """grain RandomAccessDataSource over the records of one LLaVA JSON / JSONL file.

  `source[i]` is the raw record dict with an `id` (`index<i>` when the file has none);
  images are decoded later by `parse_record(source[i], image_dir=source.image_dir)`.
  """

  def __init__(self, records_path: str, image_dir: str):
    self.records_path = records_path
    self.image_dir = image_dir
    self._records = read_records(records_path)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index) -> dict:
    index = operator.index(index)
    record = self._records[index]
    if "id" in record:
      return record
    # A shallow copy: the stored records stay as read, and the id survives the trip to
    # the worker that parses the record.
    return {**record, "id": f"index{index % len(self)}"}

  def __repr__(self) -> str:
    return (f"LlavaJsonSource(records_path={self.records_path!r}, "
            f"image_dir={self.image_dir!r}, len={len(self)})")


def record_id(record: Any, index: int | None = None) -> str:
  """The record's `id` as a string, else `index<i>` (`index?` when the index is unknown)."""
  fallback = f"index{'?' if index is None else index}"
  return str(record.get("id", fallback)) if isinstance(record, dict) else fallback


def parse_record(record: dict, *, image_dir: str, index: int | None = None) -> Sample:
  """Validates one record and decodes its images (media paths relative to image_dir).

  Raises BadRecord: the stored error of a placeholder record; bad_conversation; bad_json
  for both `audio` and `audios`; tag_mismatch when a modality's tags over all turns do not
  number its files; missing_image / missing_video / missing_audio for a malformed field;
  missing_image and corrupt_image while decoding. Videos and audio are checked at decode.
  """
  rid = record_id(record, index)
  if not isinstance(record, dict):
    raise BadRecord(BAD_JSON, rid, f"expected an object, got {type(record).__name__}")
  if ERROR_KEY in record:
    raise _stored_error(record[ERROR_KEY], rid)
  conversation = _conversation(record.get("conversations"), rid)
  paths = media_paths(record, rid)
  from_video = check_tags(conversation, paths, rid)
  images = [decode_image(os.path.join(image_dir, p), record_id=rid) for p in paths["image"]]
  files = {m: tuple(MediaFile(os.path.join(image_dir, p)) for p in paths[m])
           for m in ("video", "audio")}
  return Sample(rid, images, conversation, files["video"], files["audio"], from_video)


def media_paths(record: dict, rid: str) -> dict[str, list[str]]:
  """{"image" | "video" | "audio": paths as the record gives them}, or BadRecord."""
  if "audio" in record and "audios" in record:
    raise BadRecord(BAD_JSON, rid, "has both 'audio' and 'audios'; give one")
  sound = record.get("audio", record.get("audios"))
  return {"image": _paths(record.get("image"), "image", MISSING_IMAGE, rid),
          "video": _paths(record.get("video"), "video", MISSING_VIDEO, rid),
          "audio": _paths(sound, "audio", MISSING_AUDIO, rid)}


def check_tags(conversation: list[tuple[str, str]], paths: dict[str, list[str]], rid: str
               ) -> bool:
  """Raises tag_mismatch unless each modality's tags number its files; returns whether the
  `<audio>` tags take the videos' audio tracks (tags, no audio files, some video)."""
  def count(tag: str) -> int:
    return sum(text.count(tag) for _, text in conversation)

  from_video = bool(count(AUDIO_TAG) and not paths["audio"] and paths["video"])
  want = {IMAGE_TAG: (len(paths["image"]), "images"), VIDEO_TAG: (len(paths["video"]), "videos"),
          AUDIO_TAG: (len(paths["video"]), "videos' audio tracks") if from_video
          else (len(paths["audio"]), "audio files")}
  for tag, (n, what) in want.items():
    if count(tag) != n:
      raise BadRecord(TAG_MISMATCH, rid, f"{count(tag)} {tag} tags for {n} {what}")
  return from_video


def _stored_error(error: Any, rid: str) -> BadRecord:
  if isinstance(error, BadRecord):
    return error
  return BadRecord(BAD_JSON, rid, str(error))


def _conversation(turns: Any, rid: str) -> list[tuple[str, str]]:
  """The `conversations` list -> [(role, text)], or BadRecord(bad_conversation)."""
  if not isinstance(turns, list) or not turns:
    raise BadRecord(BAD_CONVERSATION, rid, f"conversations must be a non-empty list, got "
                    f"{_describe(turns)}")
  return [_turn(t, n, rid) for n, t in enumerate(turns)]


def _turn(turn: Any, n: int, rid: str) -> tuple[str, str]:
  if not isinstance(turn, dict):
    raise BadRecord(BAD_CONVERSATION, rid, f"turn {n} is {_describe(turn)}, not an object")
  role, text = turn.get("from"), turn.get("value")
  if not isinstance(role, str) or not isinstance(text, str):
    raise BadRecord(BAD_CONVERSATION, rid, f"turn {n} needs string 'from' and 'value'")
  if role not in ROLES:
    raise BadRecord(BAD_CONVERSATION, rid, f"turn {n} has unknown role {role!r}")
  return role, text


def _paths(value: Any, key: str, reason: str, rid: str) -> list[str]:
  """A media field (absent, a path, or a list of paths) -> list of paths."""
  if value is None:
    return []
  paths = [value] if isinstance(value, str) else value
  if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
    raise BadRecord(reason, rid, f"{key} must be a path or a list of paths, got "
                    f"{_describe(value)}")
  return paths


def _describe(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."
