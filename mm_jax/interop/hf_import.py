"""Start from Hugging Face weights: check shapes against the preset, stream tensors into shards.

`config.init` names local folders (safetensors only): a vision tower (CLIPVisionModel /
SiglipVisionModel, or the vision half of a CLIPModel / SiglipModel), a decoder
(LlamaForCausalLM, Mistral without sliding window, or PhiForCausalLM), a whole
LlavaForConditionalGeneration (LLaMA or Phi text model),
and an audio tower (the encoder of a WhisperModel / WhisperForConditionalGeneration, or a
bare WhisperEncoder).
The preset stays the source of truth for shapes: the folder's config.json is read with the
`hf_mapping` readers and every field that changes shapes or numerics must agree, else a
ConfigError names the preset key, both values and the HF key.

`init_from_hf` replaces the covered parameters of sharded nnx.State trees one tensor at a
time: a memory-mapped read, the `Rule` conversion to our layout, then
`jax.make_array_from_callback`, so each process only copies its addressable shards to
its devices and no host ever holds more than one whole tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from mm_jax.config import ConfigError, InitConfig, ModelConfig, VisionConfig
from mm_jax.interop import audio_mapping as am
from mm_jax.interop import hf_config as hc
from mm_jax.interop import hf_mapping as hm
from mm_jax.interop import video_mapping
from mm_jax.interop.safetensors_io import SafetensorsFolder
from mm_jax.models import stack

# ----------------------------------------------------------------------------- config.json

# Class defaults of the transformers configs (5.x; unchanged since 4.3x), for the sparse
# config.json files of published checkpoints (llava-hf's text_config names only what
# differs from LlamaConfig). transformers applies the same defaults when it loads them.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
                    sliding_window=4096, tie_word_embeddings=False),
    # No partial_rotary_factor: PhiConfig's 0.5 is not Phi-2's 0.4, so a file without it
    # is refused (hf_mapping names the key); published Phi config.json files all set it.
    "phi": dict(vocab_size=51200, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=24, num_attention_heads=32, hidden_act="gelu_new",
                layer_norm_eps=1e-5, rope_theta=10000.0, qk_layernorm=False,
                tie_word_embeddings=False),
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "llava": dict(image_token_index=32000, projector_hidden_act="gelu",
                  vision_feature_select_strategy="default", vision_feature_layer=-2,
                  multimodal_projector_bias=True, tie_word_embeddings=False),
    "whisper": dict(num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
                    encoder_ffn_dim=1536, max_source_positions=1500, activation_function="gelu"),
}
# LlavaConfig's vision tower when config.json has no vision_config: CLIP ViT-L/14-336.
_LLAVA_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                     num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)
_SUB = {"text_config": "llama", "vision_config": "clip_vision_model"}


def complete(cfg: Mapping[str, Any], model_type: str | None = None) -> dict[str, Any]:
  """A config.json dict with the class defaults filled in (sub-configs too)."""
  out = dict(cfg)
  kind = out.setdefault("model_type", model_type)
  for key, value in _DEFAULTS.get(kind, {}).items():
    if key == "rope_theta" and (out.get("rope_parameters") or {}).get("rope_theta"):
      continue
    out.setdefault(key, value)
  if kind == "llava":
    out.setdefault("vision_config", dict(_LLAVA_VISION))
    out.setdefault("text_config", {})
  for key, default_type in _SUB.items():
    if isinstance(out.get(key), Mapping):
      out[key] = complete(out[key], out[key].get("model_type") or default_type)
  return out


def read_config(folder: str) -> dict[str, Any]:
  """FOLDER/config.json, completed with the transformers class defaults."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing (a Hugging Face model folder has config.json)")
  with open(path) as f:
    return complete(json.load(f))


# Preset field -> the HF key it is compared with ("" : the select strategy mapping).
VISION_KEYS = dict(kind="model_type", image_size="image_size", patch_size="patch_size",
                    width="hidden_size", depth="num_hidden_layers", heads="num_attention_heads",
                    mlp_dim="intermediate_size", layer_norm_eps="layer_norm_eps")
# family first: a LLaMA folder for a Phi preset is reported as that, not as a width.
DECODER_KEYS = dict(family="model_type", vocab_size="vocab_size", width="hidden_size",
                    depth="num_hidden_layers", heads="num_attention_heads",
                    kv_heads="num_key_value_heads", head_size="head_dim",
                    mlp_dim="intermediate_size", rope_theta="rope_parameters.rope_theta",
                    norm_eps="rms_norm_eps", tie_embeddings="tie_word_embeddings",
                    norm="model_type", mlp="hidden_act", parallel_block="model_type",
                    rotary_fraction="rope_parameters.partial_rotary_factor",
                    attention_bias="attention_bias", mlp_bias="mlp_bias",
                    lm_head_bias="architectures: only PhiForCausalLM has a lm_head bias")
PHI_DECODER_KEYS = {**DECODER_KEYS, "norm_eps": "layer_norm_eps",
                    "attention_bias": "model_type", "mlp_bias": "model_type"}


def decoder_keys(family: str) -> dict[str, str]:
  """Preset field -> HF key, for a text config of `family` (the preset's)."""
  return PHI_DECODER_KEYS if family == "phi" else DECODER_KEYS


LLAVA_VISION_KEYS = dict(feature_layer="vision_feature_layer",
                          feature_select="vision_feature_select_strategy")
# pool and projector are ours (Whisper has neither): they come from the preset.
AUDIO_KEYS = dict(n_mels="num_mel_bins", width="d_model", depth="encoder_layers",
                  heads="encoder_attention_heads", mlp_dim="encoder_ffn_dim",
                  max_source_positions="max_source_positions",
                  layer_norm_eps="no key: WhisperEncoder's nn.LayerNorm default")


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-9)
  return a == b


def compare(ours: Any, theirs: Any, keys: Mapping[str, str], where: str, path: str,
            hf_prefix: str = "") -> None:
  """ConfigError on the first field of `keys` where the preset and the folder differ."""
  for field, hf_key in keys.items():
    a, b = getattr(ours, field), getattr(theirs, field)
    if not _same(a, b):
      name = "head_dim" if field == "head_size" else field
      raise ConfigError(f"{where}.{name}: {a!r} in the preset, {b!r} in {path} "
                        f"({hf_prefix}{hf_key})")


def _hf_config(folder: str, init_key: str, reader, *args, **kw):
  """reader(*args, **kw), with a folder's own config errors pinned to its file."""
  try:
    return reader(*args, **kw)
  except ConfigError as e:
    raise ConfigError(f"config.init.{init_key}: {folder}/config.json: {e}") from None


def _check_mean_std(folder: str, vision: VisionConfig) -> None:
  """The folder's image processor (if it ships one) must normalise as the preset does."""
  path = os.path.join(folder, "preprocessor_config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    proc = json.load(f)
  for field, key in (("mean", "image_mean"), ("std", "image_std")):
    if key in proc and not np.allclose(proc[key], getattr(vision, field), rtol=1e-4):
      raise ConfigError(f"config.model.vision.{field}: {tuple(getattr(vision, field))} in the "
                        f"preset, {tuple(proc[key])} in {path} ({key})")


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
  """One folder and the rules (mm paths from the model root) its tensors feed.

  family: normalize_keys layout; only: key prefix to read (a CLIPModel's `vision_model.`);
  tied: a stored `lm_head.weight` is the embedding table again and is skipped;
  verify: (normalised key, check) for tensors that are read and checked but not loaded
  (Whisper's fixed `embed_positions.weight`); check raises ValueError.
  vocab_rows: rows of the hf_mapping.VOCAB_ROWS tensors when an export grew them past the
  preset's vocabulary (0: as the rules say); the extra rows must be zero and are dropped
  (checked as each tensor streams in, so a non-zero row stops the import there).
  skip: normalised keys that are stored but read by no parameter.
  """

  folder: str
  family: str
  rules: tuple[hm.Rule, ...]
  only: str = ""
  tied: bool = False
  verify: tuple[tuple[str, Callable[[np.ndarray], None]], ...] = ()
  vocab_rows: int = 0
  skip: tuple[str, ...] = ()  # stored keys that are not read (LLaVA-NeXT's image_newline)


def _rooted(rules: Sequence[hm.Rule], prefix: hm.Path) -> tuple[hm.Rule, ...]:
  return tuple(dataclasses.replace(r, path=(*prefix, *r.path)) for r in rules)


def llava_source(folder: str, cfg: ModelConfig) -> Source:
  """A LlavaForConditionalGeneration folder, or a LlavaNextVideoForConditionalGeneration
  one (its video path: shared tower and projector; `image_newline` is not read)."""
  path = os.path.join(folder, "config.json")
  raw = read_config(folder)
  _expect_type(raw, ("llava", "llava_next_video"), "llava_from_hf", path)
  video = raw["model_type"] == "llava_next_video"
  if video:
    theirs = _hf_config(folder, "llava_from_hf",
                        video_mapping.model_config_from_hf_llava_next_video, raw,
                        cfg.video.num_frames)
  else:
    theirs = _hf_config(folder, "llava_from_hf", hc.model_config_from_hf_llava, raw)
  _check_text(raw["text_config"], folder)
  # hf_export's zero rows up to the placeholder id (tiny: V 128 -> 129) are not vocabulary.
  v, rows = cfg.decoder.vocab_size, theirs.decoder.vocab_size
  grown = rows if rows > v and rows == hm.grown_vocab(cfg) else 0
  if grown:
    decoder = dataclasses.replace(theirs.decoder, vocab_size=v)
    theirs = dataclasses.replace(theirs, decoder=decoder)
  compare(cfg.vision, theirs.vision, VISION_KEYS, "config.model.vision", path, "vision_config.")
  compare(cfg.vision, theirs.vision, LLAVA_VISION_KEYS, "config.model.vision", path)
  compare(cfg.decoder, theirs.decoder, decoder_keys(cfg.decoder.family),
          "config.model.decoder", path, "text_config.")
  if "image" in cfg.modalities or not video:
    compare(cfg, theirs, dict(image_token_id="image_token_index"), "config.model", path)
  compare(cfg.projector, theirs.projector, dict(kind="projector_hidden_act"),
          "config.model.projector", path)
  if video:
    compare(cfg, theirs, dict(video_token_id="video_token_index"), "config.model", path)
    compare(cfg.video, theirs.video, dict(pool="spatial_pool_stride"), "config.model.video",
            path)
  _check_mean_std(folder, cfg.vision)
  rules = video_mapping.llava_next_video_rules(cfg) if video else hm.llava_rules(cfg)
  return Source(folder, "llava", tuple(rules), tied=cfg.decoder.tie_embeddings,
                vocab_rows=grown, skip=video_mapping._NEWLINE if video else ())


def vision_source(folder: str, cfg: ModelConfig) -> Source:
  path = os.path.join(folder, "config.json")
  raw = read_config(folder)
  full = raw["model_type"] in ("clip", "siglip")  # CLIPModel / SiglipModel: the vision half
  if full:
    raw = raw.get("vision_config") or {}
  _expect_type(raw, ("clip_vision_model", "siglip_vision_model"), "vision_from_hf", path)
  v = cfg.vision
  theirs = _hf_config(folder, "vision_from_hf", hc.vision_config_from_hf, raw,
                      feature_layer=v.feature_layer, feature_select=v.feature_select,
                      mean=v.mean, std=v.std)
  compare(v, theirs, VISION_KEYS, "config.model.vision", path,
          "vision_config." if full else "")
  _check_mean_std(folder, v)
  return Source(folder, "vision", _rooted(hm.vision_rules(v), ("towers", "image")),
                only="vision_model." if full else "")


def decoder_source(folder: str, cfg: ModelConfig) -> Source:
  path = os.path.join(folder, "config.json")
  raw = read_config(folder)
  _expect_type(raw, ("llama", "mistral", "phi"), "decoder_from_hf", path)
  _check_text(raw, folder)
  theirs = _hf_config(folder, "decoder_from_hf", hc.decoder_config_from_hf, raw)
  compare(cfg.decoder, theirs, decoder_keys(cfg.decoder.family), "config.model.decoder", path)
  return Source(folder, cfg.decoder.family,
                _rooted(hm.decoder_rules(cfg.decoder), ("decoder",)),
                tied=cfg.decoder.tie_embeddings)


def audio_source(folder: str, cfg: ModelConfig) -> Source:
  """The encoder of a Whisper folder -> towers/audio; its decoder (if any) is not read."""
  if "audio" not in cfg.modalities:
    raise ConfigError(f"config.init.audio_from_hf: needs 'audio' in config.model.modalities "
                      f"(got {cfg.modalities})")
  path = os.path.join(folder, "config.json")
  raw = read_config(folder)
  _expect_type(raw, ("whisper",), "audio_from_hf", path)
  a = cfg.audio
  theirs = _hf_config(folder, "audio_from_hf", am.audio_config_from_hf, raw, pool=a.pool,
                      projector=a.projector)
  compare(a, theirs, AUDIO_KEYS, "config.model.audio", path)
  only = am.encoder_prefix(SafetensorsFolder(folder).keys())
  # Our tower computes the sinusoidal table: a stored one must be that table (not trained).
  positions = lambda x: am.check_positions(x, a)
  return Source(folder, "whisper", _rooted(am.audio_rules(a), ("towers", "audio")), only=only,
                verify=(("embed_positions.weight", positions),))


def _expect_type(raw: Mapping[str, Any], kinds: tuple[str, ...], init_key: str,
                 path: str) -> None:
  if raw.get("model_type") not in kinds:
    raise ConfigError(f"config.init.{init_key}: {path} has model_type "
                      f"{raw.get('model_type')!r}, expected one of {kinds}")


def _check_text(raw: Mapping[str, Any], folder: str) -> None:
  if raw.get("sliding_window") is not None:
    raise ConfigError(f"config.init: {folder}/config.json sets sliding_window="
                      f"{raw['sliding_window']}; sliding-window attention is not implemented")


def sources(init: InitConfig, cfg: ModelConfig) -> list[Source]:
  """The configured folders, each checked against `cfg` (ConfigError on any mismatch)."""
  out = []
  if init.llava_from_hf:
    out.append(llava_source(init.llava_from_hf, cfg))
  if init.vision_from_hf:
    out.append(vision_source(init.vision_from_hf, cfg))
  if init.decoder_from_hf:
    out.append(decoder_source(init.decoder_from_hf, cfg))
  if init.audio_from_hf:
    out.append(audio_source(init.audio_from_hf, cfg))
  return out


def covered(init: InitConfig, cfg: ModelConfig) -> set[hm.Path]:
  """Parameter paths that `init`'s folders provide."""
  return {r.path for src in sources(init, cfg) for r in src.rules}


# ----------------------------------------------------------------------------- tensors


def _names(src: Source, st: SafetensorsFolder) -> dict[str, str]:
  """Normalised (5.x) key -> the key stored in the folder; refuses any unused tensor."""
  stored = [k for k in st.keys() if k.startswith(src.only)]
  names = hm.normalize_keys({k: k for k in stored}, src.family)
  wanted = {r.hf for r in src.rules} | {key for key, _ in src.verify}
  for key, name in names.items():
    skip = hm.ignored(key) or (src.tied and key == "lm_head.weight") or key in src.skip
    if key not in wanted and not skip:
      raise ValueError(f"{name} in {st.file_of(name)}: no parameter of the model takes it "
                       f"(config.init expects a {src.family} checkpoint matching the preset)")
  return names


def tensors(src: Source) -> Iterator[tuple[hm.Path, hm.Rule, np.ndarray]]:
  """(mm path, rule, float[mm_shape] in the source dtype), one tensor at a time."""
  st = SafetensorsFolder(src.folder)
  names = _names(src, st)
  for key, check in src.verify:  # before any tensor is handed out
    if key not in names:
      raise ValueError(f"{src.folder}: tensor {key!r} is missing from its safetensors files")
    try:
      check(st.get(names[key]))
    except ValueError as e:
      raise ValueError(f"{names[key]} in {st.file_of(names[key])}: {e}") from None
  for rule in src.rules:
    name = names.get(rule.hf)
    if name is None:
      raise ValueError(f"{src.folder}: tensor {rule.hf!r} (for {hm.path_str(rule.path)}) "
                       "is missing from its safetensors files")
    x = st.get(name)
    if src.vocab_rows and rule.hf in hm.VOCAB_ROWS:
      x = _drop_grown_rows(x, src.vocab_rows, rule, f"{name} in {st.file_of(name)}")
    if x.shape != rule.hf_shape:
      raise ValueError(f"{name} in {st.file_of(name)}: shape {x.shape}, expected "
                       f"{rule.hf_shape} for {hm.path_str(rule.path)}")
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
      raise ValueError(f"{name} in {st.file_of(name)}: dtype {x.dtype} is not floating point")
    yield rule.path, rule, rule.to_mm(x)


def _drop_grown_rows(x: np.ndarray, rows: int, rule: hm.Rule, where: str) -> np.ndarray:
  """x [rows, ...] -> x[:V] for the rule's V, if rows V.. are zero (hf_export's padding)."""
  v = rule.hf_shape[0]
  if x.shape != (rows, *rule.hf_shape[1:]):
    raise ValueError(f"{where}: shape {x.shape}, expected {(rows, *rule.hf_shape[1:])} "
                     f"(config.json's vocab_size) for {hm.path_str(rule.path)}")
  if np.any(np.asarray(x[v:], np.float32)):
    extra = f"row {v} is" if rows == v + 1 else f"rows {v}-{rows - 1} are"
    raise ValueError(f"{where}: {extra} not zero, so vocabulary, not an export's padding "
                     f"up to the image token: set config.model.decoder.vocab_size={rows}")
  return x[:v]


def _sharded(x: np.ndarray, like: jax.Array | jax.ShapeDtypeStruct) -> jax.Array:
  """x as an array with `like`'s shape, dtype and sharding; each device gets its slice."""
  return jax.make_array_from_callback(like.shape, like.sharding,
                                      lambda index: np.asarray(x[index], like.dtype))


def init_from_hf(init: InitConfig, cfg: ModelConfig,
                 trees: Sequence[nnx.State]) -> list[nnx.State]:
  """`trees` (e.g. TrainState.params and .frozen) with every parameter that the folders of
  `init` cover replaced, same shapes, dtypes and shardings; the rest are kept as they are.
  Leaves may be jax.ShapeDtypeStructs carrying shardings: covered ones become arrays
  without anything else ever being allocated.

  Raises ConfigError if a folder's config disagrees with `cfg`, ValueError naming the
  tensor and file if a tensor is missing, unused or of the wrong shape.
  """
  srcs = sources(init, cfg)
  if not srcs:
    return list(trees)
  flats = [dict(nnx.to_flat_state(t)) for t in trees]
  owner = {path: flat for flat in flats for path in flat}
  # A scanned stack's leaf [L, ...] takes its L layers' tensors: they are read one after
  # another (rules reordered), so one stacked leaf at most is ever held on the host.
  layer = stack.layer_index((p, v) for flat in flats for p, v in flat.items())
  pending: dict[hm.Path, list] = {}
  for src in srcs:
    where = lambda r: layer.get(r.path, (r.path, 0))  # (leaf, layer)
    first: dict[hm.Path, int] = {}
    for r in src.rules:
      first.setdefault(where(r)[0], len(first))
    rules = sorted(src.rules, key=lambda r: (first[where(r)[0]], where(r)[1]))
    for path, rule, x in tensors(dataclasses.replace(src, rules=tuple(rules))):
      target, i = layer.get(path, (path, None))
      if target not in owner:
        raise ValueError(f"{rule.hf} ({src.folder}): the model has no parameter "
                         f"{hm.path_str(path)}")
      var = owner[target][target]
      if i is None:
        owner[target][target] = var.replace(_sharded(x, var.get_value()))
        continue
      parts = pending.setdefault(target, [None] * var.shape[0])
      parts[i] = x
      if all(p is not None for p in parts):
        owner[target][target] = var.replace(_sharded(np.stack(parts), var.get_value()))
        del pending[target]
  if pending:  # a folder gave some layers of a stack only (a config check should stop it)
    target = next(iter(pending))
    raise ValueError(f"{hm.path_str(target)}: the folders give layers "
                     f"{[i for i, p in enumerate(pending[target]) if p is not None]} only")
  return [nnx.from_flat_state(list(flat.items())) for flat in flats]
