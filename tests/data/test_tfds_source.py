"""The tfds source: LLaVA JSON + images -> ArrayRecord once, read back at random without TF."""

import json
import os
import pickle
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mm_jax.data import sources, tfds_source
from mm_jax.data.errors import BadRecord
from mm_jax.data.media import decode_image
from mm_jax.data.tfds_source import TfdsRecords, build, parse_tfds_record


def _turns(*values):
  return [{"from": role, "value": v} for role, v in zip(["human", "gpt"] * 4, values, strict=False)]


RECORDS = [
  {"id": "caption", "image": "a.png", "conversations": _turns("<image>\nDescribe.", "Red.")},
  {"id": 7, "image": ["sub/b.jpg", "c.png"],
   "conversations": _turns("<image> or <image>?", "The first.", "Sure?", "Yes, «sûr».")},
  {"id": "text", "conversations": _turns("Say hi.", "Hi ✓")},
  {"id": "gone", "image": "missing.png", "conversations": _turns("<image>", "x")},
  {"image": "a.png", "conversations": _turns("two <image> <image>", "x")},  # no id
  {"id": "corrupt", "image": "bad.jpg", "conversations": _turns("<image>", "x")},
  {"id": "no_turns", "image": "a.png", "conversations": []},
]


def _write_inputs(root):
  """Images (PNG, JPEG, RGBA PNG, a truncated JPEG) and RECORDS as a .json list."""
  (root / "img" / "sub").mkdir(parents=True)
  Image.new("RGB", (6, 4), (200, 10, 10)).save(root / "img" / "a.png")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (5, 7, 3), np.uint8)).save(root / "img" / "sub" / "b.jpg")
  Image.new("RGBA", (3, 3), (0, 0, 255, 128)).save(root / "img" / "c.png")
  (root / "img" / "bad.jpg").write_bytes((root / "img" / "sub" / "b.jpg").read_bytes()[:40])
  (root / "records.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
  return str(root / "records.json"), str(root / "img")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  json_path, image_dir = _write_inputs(root)
  path = build(json_path, image_dir, str(root / "data"))
  return json_path, image_dir, path, TfdsRecords(path)


def _by_id(records: TfdsRecords) -> dict[str, dict]:
  return {r["id"]: r for r in (records[i] for i in range(len(records)))}


def test_every_record_is_stored_once_with_its_fields(built):
  _, _, path, records = built
  assert len(records) == len(RECORDS)
  assert path.endswith(os.path.join("llava_records", path.split(os.sep)[-2],
                                   tfds_source.BUILDER_VERSION))
  got = _by_id(records)
  assert set(got) == {str(sources.record_id(r, i)) for i, r in enumerate(RECORDS)}
  assert "index4" in got  # the id the llava_json source gives the same record
  for i, original in enumerate(RECORDS):
    rec = got[sources.record_id(original, i)]
    assert json.loads(rec["conversations"]) == original["conversations"]
    image = original.get("image", [])
    assert rec["image_paths"] == ([image] if isinstance(image, str) else image)


def test_random_access_decodes_like_the_files(built):
  _, image_dir, _, records = built
  for i in np.random.default_rng(1).permutation(len(records)):
    rec = records[np.int64(i)]  # grain hands numpy integers
    if rec["id"] not in ("caption", "7", "text"):
      continue
    sample = parse_tfds_record(rec)
    assert sample.conversation == [(t["from"], t["value"])
                                   for t in json.loads(rec["conversations"])]
    want = [decode_image(os.path.join(image_dir, p), record_id="x") for p in rec["image_paths"]]
    assert len(sample.images) == len(want)
    for got, ref in zip(sample.images, want, strict=True):
      np.testing.assert_array_equal(got, ref)
  assert records[-1] == records[len(records) - 1]
  with pytest.raises(IndexError):
    records[len(records)]


def test_same_sample_or_same_reason_as_parse_record(built):
  json_path, image_dir, _, records = built
  originals = {sources.record_id(r, i): r for i, r in enumerate(sources.read_records(json_path))}
  for rid, rec in _by_id(records).items():
    want, got = _outcome(sources.parse_record, originals[rid], image_dir=image_dir), _outcome(
      parse_tfds_record, rec)
    if isinstance(want, str):
      assert got == want, rid
    else:
      assert (got.id, got.conversation) == (want.id, want.conversation)
      assert all(np.array_equal(a, b) for a, b in zip(got.images, want.images, strict=True))


def _outcome(parse, *args, **kwargs):
  """The Sample, or the BadRecord's reason."""
  try:
    return parse(*args, **kwargs)
  except BadRecord as e:
    return e.reason


def test_broken_records_are_flagged_at_build_and_raised_at_parse(built):
  _, image_dir, _, records = built
  got = _by_id(records)
  gone = got["gone"]
  assert gone["images"] == [] and gone["image_paths"] == ["missing.png"]
  assert gone["error"].startswith("missing_image: ") and "missing.png" in gone["error"]
  with pytest.raises(BadRecord, match="missing.png") as e:
    parse_tfds_record(gone)
  assert (e.value.reason, e.value.record_id) == ("missing_image", "gone")
  assert got["index4"]["error"] == "tag_mismatch: 2 <image> tags for 1 images"
  assert got["no_turns"]["error"].startswith("bad_conversation: ")
  assert got["corrupt"]["error"] == ""  # bytes are stored; decoding finds the damage
  with pytest.raises(BadRecord, match=r"record corrupt: corrupt_image: bad\.jpg: ") as e:
    parse_tfds_record(got["corrupt"])


def test_jsonl_placeholders_keep_their_reason(tmp_path):
  path = tmp_path / "records.jsonl"
  good = {"id": "ok", "conversations": _turns("q", "a")}
  path.write_bytes(json.dumps(good).encode() + b"\n{broken\n")
  records = TfdsRecords(build(str(path), str(tmp_path), str(tmp_path / "data")))
  got = _by_id(records)
  assert parse_tfds_record(got["ok"]).conversation == [("human", "q"), ("gpt", "a")]
  with pytest.raises(BadRecord) as e:
    parse_tfds_record(got["records.jsonl:line2"])
  want = sources.read_records(str(path))[1][sources.ERROR_KEY]
  assert (e.value.reason, e.value.detail) == ("bad_json", want.detail)


def test_second_build_reuses_the_files(tmp_path, monkeypatch):
  json_path, image_dir = _write_inputs(tmp_path)
  path = build(json_path, image_dir, str(tmp_path / "data"))
  stamps = {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path)}

  def no_reading(_):
    raise AssertionError("rebuilt")

  monkeypatch.setattr(sources, "read_records", no_reading)
  assert build(json_path, image_dir, str(tmp_path / "data")) == path
  assert {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path)} == stamps
  monkeypatch.undo()
  # Another JSON under the same name gets its own directory instead of the stale examples.
  with open(json_path, "a") as f:
    f.write("\n")
  other = build(json_path, image_dir, str(tmp_path / "data"))
  assert other != path and len(TfdsRecords(other)) == len(RECORDS)


def test_empty_json_is_a_clear_error(tmp_path):
  (tmp_path / "empty.json").write_text("[]")
  with pytest.raises(ValueError, match="no records"):
    build(str(tmp_path / "empty.json"), str(tmp_path), str(tmp_path / "data"))


def test_pickles_for_grain_workers(built):
  _, _, path, records = built
  back = pickle.loads(pickle.dumps(records))
  assert (back.path, len(back), back[0]) == (path, len(records), records[0])
  ds = grain.MapDataset.source(back).map(parse_tfds_record)
  assert ds[_index_of(back, "caption")].id == "caption"
  assert repr(back).startswith("TfdsRecords(")


def test_tfds_data_source_by_name_gives_raw_examples_that_parse(built):
  _, _, path, _ = built
  name_dir, config = os.path.split(os.path.dirname(path))  # data_dir/name/config/version
  version = tfds_source.BUILDER_VERSION
  raw = tfds.data_source(f"llava_records/{config}:{version}", split="train", download=False,
                         data_dir=os.path.dirname(name_dir))
  example = raw[_index_of(raw, "caption")]
  assert isinstance(example["id"], bytes)  # tfds hands Text back as bytes
  assert parse_tfds_record(example).conversation[1] == ("gpt", "Red.")


def _index_of(records, rid: str) -> int:
  return next(i for i in range(len(records)) if records[i]["id"] in (rid, rid.encode()))


def test_features_are_the_documented_ones():
  assert set(tfds_source.features().keys()) == {"id", "conversations", "images",
                                                "image_paths", "videos", "video_paths",
                                                "audios", "audio_paths", "error"}


def test_tensorflow_never_imported():
  """Runs last in this file: nothing above (building, reading, grain) pulled in TensorFlow."""
  assert "tensorflow" not in sys.modules
