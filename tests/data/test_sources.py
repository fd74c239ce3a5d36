"""The llava_json source: reading JSON / JSONL records, parse_record, and every BadRecord reason."""

import json
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from mm_jax.data.errors import REASONS, BadRecord
from mm_jax.data.sources import LlavaJsonSource, Sample, parse_record, read_records


def _image(path, colour, size=(6, 4)):
  """Writes a constant RGB PNG of (width, height) `size` and returns its pixels."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, colour).save(path)
  return np.full((size[1], size[0], 3), colour, np.uint8)


def _turn(role, value):
  return {"from": role, "value": value}


def _reason(record, image_dir) -> str:
  with pytest.raises(BadRecord) as e:
    parse_record(record, image_dir=str(image_dir))
  return e.value.reason


def test_bad_record_message_reasons_and_pickling():
  e = BadRecord("tag_mismatch", "42", "2 tags for 1 image")
  assert isinstance(e, ValueError) and str(e) == "record 42: tag_mismatch: 2 tags for 1 image"
  back = pickle.loads(pickle.dumps(e))
  assert (back.reason, back.record_id, back.detail, str(back)) == (
    e.reason, e.record_id, e.detail, str(e))
  assert REASONS == {"missing_image", "corrupt_image", "tag_mismatch", "bad_conversation",
                     "bad_json", "too_long", "too_many_images", "not_utf8", "missing_audio",
                     "corrupt_audio", "missing_video", "corrupt_video", "too_many_media"}
  with pytest.raises(ValueError, match="unknown BadRecord reason"):
    BadRecord("oops", "1", "x")


def test_read_json_list(tmp_path):
  records = [{"id": "a", "conversations": []}, {"id": "b"}]
  path = tmp_path / "data.json"
  path.write_text(json.dumps(records), encoding="utf-8-sig")   # with a BOM
  assert read_records(str(path)) == records


def test_malformed_json_file_raises_with_file_and_position(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[\n  {"id": 1},\n  {"id": 2,,}\n]')
  with pytest.raises(ValueError, match=r"broken\.json: invalid JSON at line 3 column"):
    read_records(str(path))
  path.write_text('{"id": 1}')
  with pytest.raises(ValueError, match="expected a JSON list"):
    read_records(str(path))
  with pytest.raises(ValueError, match="'.csv'"):
    read_records(str(tmp_path / "data.csv"))


def test_read_jsonl_turns_bad_lines_into_placeholders(tmp_path):
  path = tmp_path / "data.jsonl"
  lines = [b'{"id": "a", "x": "caf\xc3\xa9"}', b'{"id": "b", oops}', b"", b'{"id": "\xff\xfe"}',
           b"[1, 2]", b'{"id": "c"}']
  path.write_bytes(b"\n".join(lines) + b"\n")
  records = read_records(str(path))
  assert [r["id"] for r in records] == ["a", "data.jsonl:line2", "data.jsonl:line4",
                                        "data.jsonl:line5", "c"]
  assert records[0] == {"id": "a", "x": "café"} and records[4] == {"id": "c"}
  errors = [r["_error"] for r in records[1:4]]
  assert [e.reason for e in errors] == ["bad_json", "not_utf8", "bad_json"]
  assert [e.record_id for e in errors] == ["data.jsonl:line2", "data.jsonl:line4",
                                           "data.jsonl:line5"]
  with pytest.raises(BadRecord) as e:
    parse_record(records[2], image_dir=str(tmp_path))
  assert e.value is errors[1]


def test_source_serves_raw_records_with_ids(tmp_path):
  path = tmp_path / "data.json"
  path.write_text(json.dumps([{"id": 7, "conversations": []}, {"conversations": []}]))
  source = LlavaJsonSource(str(path), str(tmp_path))
  assert len(source) == 2
  assert source[0] == {"id": 7, "conversations": []}
  assert source[np.int64(1)] == {"id": "index1", "conversations": []}
  assert "id" not in read_records(str(path))[1]
  assert "len=2" in repr(source)
  assert pickle.loads(pickle.dumps(source))[1]["id"] == "index1"
  assert grain.MapDataset.source(source)[1]["id"] == "index1"
  with pytest.raises(IndexError):
    source[2]


def test_caption_record(tmp_path):
  pixels = _image(tmp_path / "images/cc3m/0001.png", (10, 20, 30))
  record = {"id": "0001", "image": "cc3m/0001.png",
            "conversations": [_turn("human", "Describe the image.\n<image>"),
                              _turn("gpt", "a dark square")]}
  sample = parse_record(record, image_dir=str(tmp_path / "images"))
  assert isinstance(sample, Sample) and sample.id == "0001"
  assert len(sample.images) == 1
  np.testing.assert_array_equal(sample.images[0], pixels)
  assert sample.conversation == [("human", "Describe the image.\n<image>"),
                                 ("gpt", "a dark square")]


def test_multi_turn_instruction_record_with_an_absolute_path(tmp_path):
  _image(tmp_path / "elsewhere/x.png", (1, 2, 3), size=(5, 9))
  turns = [_turn("human", "<image>\nWhat is it?"), _turn("gpt", "A tile."),
           _turn("human", "What colour?"), _turn("gpt", "Almost black.")]
  record = {"id": 3, "image": str(tmp_path / "elsewhere/x.png"), "conversations": turns}
  sample = parse_record(record, image_dir=str(tmp_path / "images"))
  assert sample.id == "3" and sample.images[0].shape == (9, 5, 3)
  assert [role for role, _ in sample.conversation] == ["human", "gpt", "human", "gpt"]


def test_text_only_record(tmp_path):
  record = {"conversations": [_turn("human", "Hi"), _turn("gpt", "Hello")]}
  sample = parse_record(record, image_dir=str(tmp_path), index=12)
  assert sample.id == "index12" and sample.images == []
  assert parse_record({**record, "image": []}, image_dir=str(tmp_path)).images == []


def test_several_images_with_tags_in_different_turns(tmp_path):
  first = _image(tmp_path / "a.png", (255, 0, 0))
  second = _image(tmp_path / "b.png", (0, 0, 255), size=(3, 3))
  record = {"id": "m", "image": ["a.png", "b.png"],
            "conversations": [_turn("human", "<image> Look."), _turn("gpt", "Red."),
                              _turn("human", "And <image>?"), _turn("gpt", "Blue.")]}
  sample = parse_record(record, image_dir=str(tmp_path))
  assert len(sample.images) == 2
  np.testing.assert_array_equal(sample.images[0], first)
  np.testing.assert_array_equal(sample.images[1], second)


@pytest.mark.parametrize("conversations", [
  None, [], "human: hi", [_turn("human", "hi"), "gpt: hello"], [{"from": "human"}],
  [_turn("human", 5)], [_turn(None, "hi")], [_turn("user", "hi")],
])
def test_bad_conversation(tmp_path, conversations):
  record = {"id": "x"} if conversations is None else {"id": "x", "conversations": conversations}
  assert _reason(record, tmp_path) == "bad_conversation"


def test_tag_mismatch(tmp_path):
  _image(tmp_path / "a.png", (0, 0, 0))
  tag, plain = [_turn("human", "<image> hi"), _turn("gpt", "ok")], [_turn("gpt", "ok")]
  two_tags = [_turn("human", "<image><image>"), _turn("gpt", "ok")]
  assert _reason({"conversations": tag}, tmp_path) == "tag_mismatch"
  assert _reason({"image": "a.png", "conversations": plain}, tmp_path) == "tag_mismatch"
  assert _reason({"image": "a.png", "conversations": two_tags}, tmp_path) == "tag_mismatch"


def test_missing_and_corrupt_images(tmp_path):
  turns = [_turn("human", "<image>"), _turn("gpt", "ok")]
  assert _reason({"image": "nope.png", "conversations": turns}, tmp_path) == "missing_image"
  assert _reason({"image": "", "conversations": turns}, tmp_path) == "missing_image"
  assert _reason({"image": [3], "conversations": turns}, tmp_path) == "missing_image"
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  assert _reason({"image": "bad.jpg", "conversations": turns}, tmp_path) == "corrupt_image"


def test_non_object_records_are_bad_json(tmp_path):
  path = tmp_path / "data.json"
  path.write_text(json.dumps([{"id": "ok"}, 5]))
  records = read_records(str(path))
  assert records[1]["id"] == "data.json:item1"
  assert _reason(records[1], tmp_path) == "bad_json"
  assert _reason(["not", "a", "dict"], tmp_path) == "bad_json"
