"""safetensors files and folders in plain numpy: memory-mapped reads, sharded writes.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length, a JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}` (offsets relative to the end of the header), then the raw
little-endian tensor bytes, contiguous. Reading maps the file and slices views out of it,
so a tensor's bytes are only paged in when it is used; nothing here ever unpickles
(`pytorch_model.bin` folders are refused).

A Hugging Face folder holds either `model.safetensors` or shards named in
`model.safetensors.index.json` (`{"metadata": {"total_size"}, "weight_map": {name: file}}`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the reference implementation's limit


def dtype_name(dtype) -> str:
  """numpy dtype -> safetensors dtype name (F32, BF16, ...)."""
  name = _NAMES.get(np.dtype(dtype))
  if name is None:
    raise ValueError(f"dtype {np.dtype(dtype)} has no safetensors name (known: {sorted(DTYPES)})")
  return name


class SafetensorsFile:
  """One memory-mapped .safetensors file; `get(name)` is a read-only view, no copy."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > _MAX_HEADER:
        raise ValueError(f"{path}: header of {n} bytes; not a safetensors file?")
      header = json.loads(f.read(n))
    self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
    self._entries: dict[str, dict] = header
    self._start = 8 + n
    size = os.path.getsize(path)
    self._mm = np.memmap(path, np.uint8, mode="r") if size > self._start else None
    for name, e in header.items():
      if e["dtype"] not in DTYPES:
        raise ValueError(f"{path}: {name} has dtype {e['dtype']} (supported: {sorted(DTYPES)})")
      begin, end = e["data_offsets"]
      want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
      if end - begin != want or self._start + end > size:
        raise ValueError(f"{path}: {name} offsets {e['data_offsets']} do not fit its "
                         f"shape {e['shape']} and the file size")

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self._entries[name]["dtype"]]

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only view into the mapped file."""
    if name not in self._entries:
      raise KeyError(f"{self.path}: no tensor {name!r}")
    e = self._entries[name]
    begin, end = e["data_offsets"]
    if begin == end:
      return np.zeros(e["shape"], DTYPES[e["dtype"]])
    raw = self._mm[self._start + begin:self._start + end]
    return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])


class SafetensorsFolder:
  """The tensors of a Hugging Face model folder (single file or sharded with an index)."""

  def __init__(self, folder: str):
    self.folder = folder
    index, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map: dict[str, str] = json.load(f)["weight_map"]
      files = {fn: SafetensorsFile(os.path.join(folder, fn))
               for fn in sorted(set(weight_map.values()))}
      self._where = {k: files[fn] for k, fn in weight_map.items()}
      for k, file in self._where.items():
        if k not in file:
          raise ValueError(f"{index}: {k} is mapped to {file.path}, which lacks it")
    elif os.path.isfile(single):
      file = SafetensorsFile(single)
      self._where = {k: file for k in file.keys()}
    else:
      raise FileNotFoundError(_missing_message(folder))

  def keys(self) -> list[str]:
    return list(self._where)

  def file_of(self, name: str) -> str:
    return self._where[name].path

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].shape(name)

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(f"{self.folder}: no tensor {name!r}")
    return self._where[name].get(name)


def _missing_message(folder: str) -> str:
  if not os.path.isdir(folder):
    return f"{folder}: no such folder"
  legacy = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
  if legacy:
    return (f"{folder} holds only {legacy[:3]}: safetensors only (pickle-based checkpoints "
            "are never loaded); convert it with transformers' save_pretrained("
            "..., safe_serialization=True)")
  return f"{folder}: neither {SINGLE} nor {INDEX}"


# ----------------------------------------------------------------------------- writing

Spec = tuple[str, tuple[int, ...], np.dtype]  # name, shape, dtype


def _nbytes(spec: Spec) -> int:
  return int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize


def plan_shards(specs: Sequence[Spec], max_shard_bytes: int) -> list[list[Spec]]:
  """Greedy split in order: a shard closes before it would exceed `max_shard_bytes` (a
  tensor larger than the limit gets a shard of its own)."""
  shards: list[list[Spec]] = [[]]
  size = 0
  for spec in specs:
    n = _nbytes(spec)
    if shards[-1] and n and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += n
  return shards if shards[0] else []


def write_file(path: str, specs: Sequence[Spec], fetch: Callable[[str], np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
  """Writes `specs` to one file, calling `fetch(name)` once per tensor, in order (so only
  one tensor is held at a time)."""
  header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
  offset = 0
  for name, shape, dtype in specs:
    n = _nbytes((name, shape, dtype))
    header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as the reference writer does
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name, shape, dtype in specs:
      x = np.asarray(fetch(name))
      if x.shape != tuple(shape) or x.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: fetched {x.dtype}{list(x.shape)}, planned "
                         f"{np.dtype(dtype)}{list(shape)}")
      np.ascontiguousarray(x).tofile(f)  # native order: little-endian on every JAX host
  os.replace(tmp, path)


def write_folder(folder: str, specs: Sequence[Spec], fetch: Callable[[str], np.ndarray], *,
                 max_shard_bytes: int = 2 * 10**9,
                 metadata: Mapping[str, str] | None = None) -> list[str]:
  """Writes a Hugging Face weight folder: `model.safetensors`, or
  `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when more than one
  shard is needed. Metadata defaults to {"format": "pt"} (transformers expects it).
  Returns the files written."""
  metadata = {"format": "pt"} if metadata is None else metadata
  os.makedirs(folder, exist_ok=True)
  shards = plan_shards(specs, max_shard_bytes) or [[]]
  if len(shards) == 1:
    write_file(os.path.join(folder, SINGLE), shards[0], fetch, metadata)
    return [SINGLE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards, strict=True):
    write_file(os.path.join(folder, name), shard, fetch, metadata)
  index = {"metadata": {"total_size": sum(map(_nbytes, specs))},
           "weight_map": {s[0]: name for name, shard in zip(names, shards, strict=True)
                          for s in shard}}
  with open(os.path.join(folder, INDEX), "w") as f:
    json.dump(index, f, indent=2)
  return [*names, INDEX]


def save(folder: str, tensors: Mapping[str, np.ndarray], **kw) -> list[str]:
  """`write_folder` for tensors already in memory."""
  specs = [(k, tuple(np.shape(v)), np.asarray(v).dtype) for k, v in tensors.items()]
  return write_folder(folder, specs, lambda k: tensors[k], **kw)
