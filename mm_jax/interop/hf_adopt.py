"""The model's shape from the Hugging Face folders a run starts from (config.init.*).

A folder's config.json fixes every field that decides a parameter's shape or what the model
computes (widths, depths, heads, vocabulary, RoPE, norms, the feature layer, placeholder
ids): `adopt` writes those into the config values before they are typed, so
`--config.init.llava_from_hf=/ckpt/llava-1.5-7b-hf` fine-tunes that checkpoint from any
preset with no shape overrides. The preset keeps what a folder does not say (dtype, remat,
batch, optimizer). A key given on the command line that contradicts a folder is an error
naming both values; one that agrees is fine. A tokenizer (data.tokenizer, or the one in
the language model's folder) gives the placeholder ids and, with no language-model folder,
the vocabulary size, unless they are given on the command line.

Which folder decides which group:
  llava_from_hf   LlavaForConditionalGeneration: vision, projector kind, decoder, image id;
                  LlavaNextVideoForConditionalGeneration: also modalities=("video",), the
                  video pool and id, one shared tower and projector (video_mapping.py)
  vision_from_hf  CLIP / SigLIP vision tower (feature_layer / feature_select stay the preset's)
  decoder_from_hf LLaMA / Mistral / Phi decoder
  audio_from_hf   Whisper encoder (pool and projector stay the preset's: Whisper has neither)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Collection, Mapping
from typing import Any

from mm_jax.config import ConfigError, VisionConfig
from mm_jax.interop import audio_mapping as am
from mm_jax.interop import hf_config as hc
from mm_jax.interop import hf_import as hi

_VISION = ("kind", "image_size", "patch_size", "width", "depth", "heads", "mlp_dim",
           "layer_norm_eps")
_DECODER = tuple(f.name for f in dataclasses.fields(hc.DecoderConfig))
_AUDIO = tuple(hi.AUDIO_KEYS)
_HF_DECODER = {**hi.PHI_DECODER_KEYS, "head_dim": "head_dim"}

# flat key -> (value, config.json path, HF key)
Taken = dict[str, tuple[Any, str, str]]


def _group(prefix: str, obj: Any, names: Collection[str], path: str,
           hf_keys: Mapping[str, str], hf_prefix: str = "") -> Taken:
  return {f"{prefix}.{n}": (getattr(obj, n), path, hf_prefix + hf_keys.get(n, n))
          for n in names}


def _mean_std(folder: str, vision: VisionConfig, path_json: str) -> Taken:
  """mean/std of the folder's image processor (preprocessor_config.json), else SigLIP's."""
  proc_path = os.path.join(folder, "preprocessor_config.json")
  out: Taken = {}
  if vision.kind == "siglip":
    out = {f"model.vision.{k}": (tuple(getattr(vision, k)), path_json, "model_type")
           for k in ("mean", "std")}
  if os.path.isfile(proc_path):
    with open(proc_path) as f:
      proc = json.load(f)
    for field, key in (("mean", "image_mean"), ("std", "image_std")):
      if isinstance(proc.get(key), list) and len(proc[key]) == 3:
        out[f"model.vision.{field}"] = (tuple(float(v) for v in proc[key]), proc_path, key)
  return out


def _llava(folder: str, values: Mapping[str, Any]) -> Taken:
  path = os.path.join(folder, "config.json")
  raw = hi.read_config(folder)
  kind = raw.get("model_type")
  if kind not in ("llava", "llava_next_video"):
    raise ConfigError(f"config.init.llava_from_hf: {path} has model_type {kind!r}, expected "
                      "llava or llava_next_video")
  if kind == "llava":
    cfg = hi._hf_config(folder, "llava_from_hf", hc.model_config_from_hf_llava, raw)
  else:
    from mm_jax.interop import video_mapping

    frames = values["model"]["video"]["num_frames"]
    cfg = hi._hf_config(folder, "llava_from_hf",
                        video_mapping.model_config_from_hf_llava_next_video, raw, frames)
  taken = _group("model.vision", cfg.vision, _VISION, path, hi.VISION_KEYS, "vision_config.")
  taken |= _group("model.vision", cfg.vision, ("feature_layer", "feature_select"), path,
                  hi.LLAVA_VISION_KEYS)
  taken |= _mean_std(folder, cfg.vision, path)
  taken["model.projector.kind"] = (cfg.projector.kind, path, "projector_hidden_act")
  taken |= _group("model.decoder", cfg.decoder, _DECODER, path, _HF_DECODER, "text_config.")
  taken["model.image_token_id"] = (cfg.image_token_id, path, "image_token_index")
  if kind == "llava_next_video":
    taken["model.modalities"] = (cfg.modalities, path, "model_type")
    taken["model.video_token_id"] = (cfg.video_token_id, path, "video_token_index")
    taken |= _group("model.video", cfg.video, ("pool", "tower", "projector"), path,
                    dict(pool="spatial_pool_stride", tower="model_type",
                         projector="model_type"))
  return taken


def _vision(folder: str, values: Mapping[str, Any]) -> Taken:
  path = os.path.join(folder, "config.json")
  raw = hi.read_config(folder)
  full = raw["model_type"] in ("clip", "siglip")  # CLIPModel / SiglipModel: the vision half
  vc = raw.get("vision_config") or {} if full else raw
  hi._expect_type(vc, ("clip_vision_model", "siglip_vision_model"), "vision_from_hf", path)
  v = values["model"]["vision"]
  cfg = hi._hf_config(folder, "vision_from_hf", hc.vision_config_from_hf, vc,
                      feature_layer=v["feature_layer"], feature_select="patch")
  taken = _group("model.vision", cfg, _VISION, path, hi.VISION_KEYS,
                 "vision_config." if full else "")
  return taken | _mean_std(folder, cfg, path)


def _decoder(folder: str, values: Mapping[str, Any]) -> Taken:
  del values
  path = os.path.join(folder, "config.json")
  raw = hi.read_config(folder)
  hi._expect_type(raw, ("llama", "mistral", "phi"), "decoder_from_hf", path)
  hi._check_text(raw, folder)
  cfg = hi._hf_config(folder, "decoder_from_hf", hc.decoder_config_from_hf, raw)
  return _group("model.decoder", cfg, _DECODER, path, _HF_DECODER)


def _audio(folder: str, values: Mapping[str, Any]) -> Taken:
  path = os.path.join(folder, "config.json")
  raw = hi.read_config(folder)
  hi._expect_type(raw, ("whisper",), "audio_from_hf", path)
  a = values["model"]["audio"]
  cfg = hi._hf_config(folder, "audio_from_hf", am.audio_config_from_hf, raw, pool=a["pool"],
                      projector=a["projector"])
  return _group("model.audio", cfg, _AUDIO, path, hi.AUDIO_KEYS)


_READERS = (("llava_from_hf", _llava), ("vision_from_hf", _vision),
            ("decoder_from_hf", _decoder), ("audio_from_hf", _audio))


def _get(values: Mapping[str, Any], key: str) -> Any:
  for part in key.split("."):
    values = values[part]
  return values


def _set(values: dict[str, Any], key: str, value: Any) -> None:
  *groups, last = key.split(".")
  for part in groups:
    values = values[part]
  values[last] = value


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
  if isinstance(a, float) or isinstance(b, float):
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(
        a, b, rel_tol=1e-6)
  return a == b


def _is_explicit(key: str, explicit: Collection[str]) -> bool:
  return any(key == e or key.startswith(e + ".") for e in explicit)


def adopt(values: Mapping[str, Any], explicit: Collection[str] = ()
          ) -> tuple[dict[str, Any], list[str]]:
  """Config values (a nested dict, all groups present) with the shape fields of every
  config.init folder and the tokenizer's ids written in; returns them and one line per
  source naming the fields taken (those that changed the preset's value).

  explicit: the keys given on the command line ("model.decoder.width"); one of those that
  contradicts a folder raises ConfigError naming the key, both values and the HF key.
  """
  out = copy.deepcopy(dict(values))
  taken: Taken = {}
  for init_key, reader in _READERS:
    folder = out["init"].get(init_key)
    if not folder:
      continue
    for key, item in reader(folder, out).items():
      if key in taken and not _same(taken[key][0], item[0]):
        raise ConfigError(f"config.{key}: {taken[key][0]!r} in {taken[key][1]} "
                          f"({taken[key][2]}), {item[0]!r} in {item[1]} ({item[2]})")
      taken[key] = item
  notes = _write(out, taken, explicit)
  # A folder's placeholder ids are its weights' truth: a tokenizer that disagrees is
  # reported by the data pipeline (data/llava.py), not adopted over them.
  return out, notes + _tokenizer(out, [*explicit, *taken])


def _write(out: dict[str, Any], taken: Taken, explicit: Collection[str]) -> list[str]:
  changed: dict[str, list[str]] = {}
  for key, (value, path, hf_key) in taken.items():
    ours = _get(out, key)
    if _same(ours, value):
      continue
    if _is_explicit(key, explicit):
      raise ConfigError(f"config.{key}: {ours!r} on the command line, {value!r} in {path} "
                        f"({hf_key}); the folder's weights have its shape: drop the override")
    _set(out, key, tuple(value) if isinstance(value, list) else value)
    changed.setdefault(path, []).append(f"{key}={value!r}")
  return [f"config from {path}: {', '.join(fields)}" for path, fields in changed.items()]


def _tokenizer(out: dict[str, Any], fixed: Collection[str]) -> list[str]:
  """Placeholder ids (and, with no language-model folder, the vocabulary size) from the
  run's tokenizer, for file-based data (the embedded sources bring their own); keys in
  `fixed` (given on the command line or taken from a folder) are left as they are."""
  from mm_jax.config.run import EMBEDDED_SOURCES
  from mm_jax.data import llava as llava_data
  from mm_jax.data import text

  data, model, init = out["data"], out["model"], out["init"]
  path = data.get("tokenizer") or _folder_tokenizer(init)
  if data["source"] in EMBEDDED_SOURCES or not path:
    return []
  tags = [llava_data._TAGS[m] for m in ("image", "video", "audio")
          if m == "image" or m in model["modalities"]]
  try:
    tok = text.load_tokenizer(path, tags=tags)
  except (FileNotFoundError, ValueError, OSError) as e:
    raise ConfigError(f"config.data.tokenizer: {path}: {e}") from None
  fields = []
  for m in ("image", "video", "audio"):
    key = f"model.{m}_token_id"
    if (m == "image" or m in model["modalities"]) and not _is_explicit(key, fixed):
      if model[f"{m}_token_id"] != tok.tag_id(llava_data._TAGS[m]):
        model[f"{m}_token_id"] = tok.tag_id(llava_data._TAGS[m])
        fields.append(f"{key}={model[f'{m}_token_id']}")
  lm_folder = init.get("llava_from_hf") or init.get("decoder_from_hf")
  key = "model.decoder.vocab_size"
  if not lm_folder and not _is_explicit(key, fixed):
    if model["decoder"]["vocab_size"] != tok.vocab_size:
      model["decoder"]["vocab_size"] = tok.vocab_size
      fields.append(f"{key}={tok.vocab_size}")
  return [f"config from tokenizer {path}: {', '.join(fields)}"] if fields else []


def _folder_tokenizer(init: Mapping[str, Any]) -> str:
  folder = init.get("llava_from_hf") or init.get("decoder_from_hf")
  names = ("tokenizer.json", "tokenizer.model")
  if folder and any(os.path.isfile(os.path.join(folder, n)) for n in names):
    return folder
  return ""
