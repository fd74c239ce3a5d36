"""The `coco_captions` source: COCO's `captions_{train,val}2017.json` plus its image folder.

The official layout: `{"images": [{"id", "file_name", ...}], "annotations": [{"id",
"image_id", "caption"}], ...}`, read from `data.json` (train) or `data.eval_json` (eval),
with `file_name`s relative to `data.image_dir`. Each caption is a stage-1 sample under the
`plain` template, `<bos><image>{data.caption_separator}{caption}<eos>`, the loss on the
caption and <eos> (templates.render_caption). Captions are whitespace-normalised (COCO's
carry stray spaces and newlines).

`data.captions`: `all` makes every annotation a sample; `one` makes every image a sample
and picks one of its captions per epoch with `np.random.default_rng((data.seed, epoch,
image_id))`. The epoch comes from the grain index: `shuffle(...).repeat(None)` hands this
dataset index `epoch * len + i` (ShuffleMapDataset reshuffles per epoch and keeps the epoch
in the index), so `epoch = index // len`; eval reads one pass, epoch 0. The pick is thus
the same for a given (seed, epoch, image) whatever the worker count, process count or
restart.

Bad input follows sources.py: an unreadable or non-JSON file, or a malformed `images`
table (the index every caption refers to), raises ValueError naming the file; a missing or
corrupt image file skips the sample (missing_image / corrupt_image); an annotation whose
image_id has no `images` entry, or without a non-empty string caption, is a bad_json
sample (counted once per pass). Images without captions are not samples.
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np

from mm_jax.config import ConfigError, DataConfig
from mm_jax.data import llava, media, templates
from mm_jax.data.errors import BAD_JSON, BadRecord
from mm_jax.data.records import guarded, to_example
from mm_jax.data.text import IMAGE_TAG

ERROR_KEY = "_error"


def _load(path: str) -> dict:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    data = json.loads(raw.decode("utf-8-sig"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 (invalid byte at offset {e.start})") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
  if not (isinstance(data, dict) and isinstance(data.get("images"), list)
          and isinstance(data.get("annotations"), list)):
    raise ValueError(f"{path}: expected COCO captions JSON, an object with 'images' and "
                     "'annotations' lists")
  return data


def _image_table(images: list, path: str) -> dict[int, str]:
  """image id -> file_name; a malformed or repeated entry is a ValueError naming it."""
  table: dict[int, str] = {}
  for i, im in enumerate(images):
    ok = (isinstance(im, dict) and isinstance(im.get("id"), int)
          and isinstance(im.get("file_name"), str) and im["file_name"])
    if not ok:
      raise ValueError(f"{path}: images[{i}] needs an int 'id' and a string 'file_name'")
    if im["id"] in table:
      raise ValueError(f"{path}: images[{i}] repeats image id {im['id']}")
    table[im["id"]] = im["file_name"]
  return table


def _bad(rid: str, detail: str) -> dict:
  return {"id": rid, ERROR_KEY: BadRecord(BAD_JSON, rid, detail)}


def read_units(path: str, captions: str) -> list[dict]:
  """The samples of one captions file: `{"id", "image_id", "file", "captions": [str]}`
  per image (`one`) or per annotation (`all`), then the bad annotations as
  `{"id", "_error": BadRecord}`, in file order."""
  data = _load(path)
  files = _image_table(data["images"], path)
  by_image: dict[int, list[tuple[str, str]]] = {}
  bad = []
  for i, ann in enumerate(data["annotations"]):
    aid = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
    rid = f"annotation{aid}"
    if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
      bad.append(_bad(rid, f"annotations[{i}] needs a string 'caption'"))
    elif not isinstance(ann.get("image_id"), int) or ann["image_id"] not in files:
      bad.append(_bad(rid, f"image_id {ann.get('image_id')!r} has no entry in 'images'"))
    elif not ann["caption"].split():
      bad.append(_bad(rid, "empty caption"))
    else:
      caption = " ".join(ann["caption"].split())
      by_image.setdefault(ann["image_id"], []).append((str(aid), caption))
  if captions == "one":
    units = [{"id": f"coco{im}", "image_id": im, "file": files[im],
              "captions": [c for _, c in cs]} for im, cs in by_image.items()]
  else:
    units = [{"id": f"coco{im}/{aid}", "image_id": im, "file": files[im], "captions": [c]}
             for im, cs in by_image.items() for aid, c in cs]
  return units + bad


def pick(unit: dict, *, seed: int, epoch: int) -> str:
  """The caption of `unit` for this epoch: seeded by (seed, epoch, image id)."""
  caps = unit["captions"]
  if len(caps) == 1:
    return caps[0]
  return caps[int(np.random.default_rng((seed, epoch, unit["image_id"])).integers(len(caps)))]


def coco_examples(data: DataConfig, spec, *, split: str):
  """(MapDataset of (epoch, unit), (epoch, unit) -> example-or-marker)."""
  path = data.json if split == "train" else data.eval_json
  if not path:
    raise ConfigError("config.data.eval_json: required to evaluate a coco_captions run")
  tok = llava.tokenizer_for(data, spec)
  units = read_units(path, data.captions)
  n = len(units)
  items = grain.MapDataset.source(units).map_with_index(lambda i, unit: (i // n, unit))
  expand = {tok.tag_id(IMAGE_TAG): spec.tokens_per_image}

  def make(item) -> dict:
    epoch, unit = item
    if ERROR_KEY in unit:
      raise unit[ERROR_KEY]
    image = media.decode_image(os.path.join(data.image_dir, unit["file"]), record_id=unit["id"])
    pixels = media.preprocess(image, size=spec.image_size, aspect=data.image_aspect_ratio,
                              mean=spec.mean, std=spec.std)
    enc = templates.render_caption(tok, pick(unit, seed=data.seed, epoch=epoch), expand=expand,
                                   separator=data.caption_separator)
    return to_example(unit["id"], enc, [pixels], spec)

  return items, guarded(make, lambda item: str(item[1].get("id", "?")))
