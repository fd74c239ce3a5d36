"""Our numpy safetensors reader/writer against the reference `safetensors` package."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mm_jax.interop import safetensors_io as sio


def tensors() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {"w": rng.normal(size=(3, 4)).astype(np.float32),
          "b": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
          "h": rng.normal(size=(2, 2, 2)).astype(np.float16),
          "ids": np.arange(7, dtype=np.int64), "empty": np.zeros((0, 3), np.float32)}


def assert_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
  assert (a.dtype, a.shape) == (b.dtype, b.shape), what
  np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=what)


def test_single_file_roundtrip_and_reference_reader(tmp_path):
  t = tensors()
  assert sio.save(str(tmp_path), t) == [sio.SINGLE]
  folder = sio.SafetensorsFolder(str(tmp_path))
  assert sorted(folder.keys()) == sorted(t)
  for k, v in t.items():
    assert_same(np.asarray(folder.get(k)), v, k)
  ref = load_file(str(tmp_path / sio.SINGLE))  # the reference reader takes our file
  for k, v in t.items():
    if k != "b":  # safetensors.numpy has no bfloat16
      assert_same(ref[k], v, k)
  assert sio.SafetensorsFile(str(tmp_path / sio.SINGLE)).metadata == {"format": "pt"}


def test_reads_reference_files_lazily(tmp_path):
  t = {k: v for k, v in tensors().items() if k != "b"}
  save_file(t, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
  f = sio.SafetensorsFile(str(tmp_path / "x.safetensors"))
  view = f.get("w")
  assert isinstance(view, np.memmap) and not view.flags.writeable  # a view of the map
  for k, v in t.items():
    assert_same(np.asarray(f.get(k)), v, k)
    assert f.shape(k) == v.shape and f.dtype(k) == v.dtype


def test_sharded_index(tmp_path):
  t = tensors()
  files = sio.save(str(tmp_path), t, max_shard_bytes=40)  # w (48 B) gets a shard alone
  assert files[-1] == sio.INDEX and len(files) == 4
  assert files[0] == "model-00001-of-00003.safetensors"
  index = json.loads((tmp_path / sio.INDEX).read_text())
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in t.values())
  assert index["weight_map"]["w"] == files[0]
  folder = sio.SafetensorsFolder(str(tmp_path))
  assert folder.file_of("ids") == str(tmp_path / index["weight_map"]["ids"])
  for k, v in t.items():
    assert_same(np.asarray(folder.get(k)), v, k)


def test_refuses_pickle_only_folders_and_bad_files(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
  with pytest.raises(FileNotFoundError, match="safetensors only"):
    sio.SafetensorsFolder(str(tmp_path))
  bad = tmp_path / "bad.safetensors"
  header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
  bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
  with pytest.raises(ValueError, match="x offsets"):
    sio.SafetensorsFile(str(bad))
  with pytest.raises(ValueError, match="no safetensors name"):
    sio.save(str(tmp_path / "c"), {"z": np.zeros(2, np.complex64)})
  assert not os.path.exists(tmp_path / "c" / sio.SINGLE)
