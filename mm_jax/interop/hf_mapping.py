"""Hugging Face <-> mm_jax: configs and parameters, pure numpy (no torch import).

A `Rule` ties one HF tensor to one mm_jax parameter path (as `nnx.to_flat_state` spells it,
e.g. ("towers", "image", "blocks", 0, "q", "kernel")) and says how to convert it; the rule
lists below drive both directions. Shape letters: D width, N heads, K kv heads, H head
size, F mlp width, V vocabulary, P patches (+1 with a class token), p patch size, C = 3.

HF Linear weights are [out, in]; our `Dense` kernels are [*in, *out], so a query weight
[N*H, D] becomes [D, N, H] and an output weight [D, N*H] becomes [N, H, D]; the patch conv
weight [D, C, p, p] becomes [p, p, C, D].

Key layouts: HF state dicts are first renamed to the transformers 5.x layout
(`normalize_keys`), so both the published llava-hf layout (`vision_tower.vision_model.*`,
`language_model.model.*`, `language_model.lm_head.weight`) and the 5.x one
(`model.vision_tower.*`, `model.language_model.*`, `lm_head.weight`) load. Config readers
take `PretrainedConfig.to_dict()` (complete) dicts and fail naming the key that is missing
or unsupported; they never fall back silently where the numerics would change.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from mm_jax.config import ConfigError, DecoderConfig, ModelConfig, ProjectorConfig, VisionConfig

Path = tuple[str | int, ...]
Flat = dict[Path, np.ndarray]

# ----------------------------------------------------------------------------- configs

_VISION_KINDS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_VISION_ACTS = {"clip": ("quick_gelu",), "siglip": ("gelu_pytorch_tanh", "gelu_new")}
_VISION_EPS = {"clip": 1e-5, "siglip": 1e-6}  # CLIPVisionConfig / SiglipVisionConfig defaults
_SIGLIP_MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _req(cfg: Mapping[str, Any], key: str, where: str) -> Any:
  """cfg[key], or a ConfigError naming `where.key`."""
  if cfg.get(key) is None:
    raise ConfigError(f"{where}.{key}: missing from the Hugging Face config "
                      "(pass a complete `PretrainedConfig.to_dict()`)")
  return cfg[key]


def _expect(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{key}: {msg}")


def vision_config_from_hf(hf_vision_config: Mapping[str, Any], where: str = "vision_config",
                          **overrides: Any) -> VisionConfig:
  """CLIPVisionConfig / SiglipVisionConfig dict -> VisionConfig (`overrides` replace fields).

  SigLIP gets mean = std = 0.5 (its image processor's); pass mean/std to override.
  """
  c = hf_vision_config
  kind = _VISION_KINDS.get(_req(c, "model_type", where))
  _expect(kind is not None, f"{where}.model_type",
          f"{c['model_type']!r} is not one of {sorted(_VISION_KINDS)}")
  act = c.get("hidden_act", _VISION_ACTS[kind][0])
  _expect(act in _VISION_ACTS[kind], f"{where}.hidden_act", f"{act!r} unsupported for {kind}")
  _expect(c.get("num_channels", 3) == 3, f"{where}.num_channels", "only RGB (3) is supported")
  fields = dict(kind=kind, image_size=_req(c, "image_size", where),
                patch_size=_req(c, "patch_size", where), width=_req(c, "hidden_size", where),
                depth=_req(c, "num_hidden_layers", where),
                heads=_req(c, "num_attention_heads", where),
                mlp_dim=_req(c, "intermediate_size", where),
                layer_norm_eps=float(c.get("layer_norm_eps", _VISION_EPS[kind])),
                **(_SIGLIP_MEAN_STD if kind == "siglip" else {}))
  cfg = VisionConfig(**{**fields, **overrides})
  cfg.validate(where)
  return cfg


def _rope_value(c: Mapping[str, Any], key: str, where: str) -> float | None:
  """`key` from the top level (4.x) or `rope_parameters` (5.x); None if in neither."""
  params = c.get("rope_parameters") or {}
  found = {float(v) for v in (c.get(key), params.get(key)) if v is not None}
  _expect(len(found) <= 1, f"{where}.{key}", f"conflicts with rope_parameters.{key}")
  return found.pop() if found else None


def rope_theta_from_hf(hf_text_config: Mapping[str, Any], where: str = "text_config") -> float:
  """`rope_theta` from the top level (4.x) or `rope_parameters` (5.x); unscaled RoPE only."""
  c = hf_text_config
  params = c.get("rope_parameters") or {}
  scaling = c.get("rope_scaling") or {}
  rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
  _expect(rope_type in (None, "default"), f"{where}.rope_parameters.rope_type",
          f"{rope_type!r} RoPE scaling is not implemented (only default)")
  theta = _rope_value(c, "rope_theta", where)
  _expect(theta is not None, f"{where}.rope_theta",
          f"missing (neither {where}.rope_theta nor {where}.rope_parameters.rope_theta is set)")
  return theta


def _head_dim(c: Mapping[str, Any], width: int, heads: int) -> int:
  """DecoderConfig.head_dim: 0 when the config's head_dim is width // heads (or unset)."""
  head_dim = c.get("head_dim") or 0
  return 0 if head_dim * heads == width else head_dim


def decoder_config_from_hf(hf_text_config: Mapping[str, Any],
                           where: str = "text_config") -> DecoderConfig:
  """LlamaConfig (LLaMA/Vicuna/Mistral without sliding window) or PhiConfig (model_type
  "phi") dict -> DecoderConfig of that family, as its *ForCausalLM computes it."""
  c = hf_text_config
  if c.get("model_type") == "phi":
    return _phi_config_from_hf(c, where)
  _expect(c.get("hidden_act", "silu") == "silu", f"{where}.hidden_act", "only silu is supported")
  factor = _rope_value(c, "partial_rotary_factor", where)
  _expect(factor in (None, 1.0), f"{where}.partial_rotary_factor",
          f"{factor}: partial rotary is implemented for model_type phi only")
  width, heads = _req(c, "hidden_size", where), _req(c, "num_attention_heads", where)
  cfg = DecoderConfig(vocab_size=_req(c, "vocab_size", where), width=width,
                      depth=_req(c, "num_hidden_layers", where), heads=heads,
                      kv_heads=c.get("num_key_value_heads") or heads,
                      head_dim=_head_dim(c, width, heads),
                      mlp_dim=_req(c, "intermediate_size", where),
                      rope_theta=rope_theta_from_hf(c, where),
                      norm_eps=float(_req(c, "rms_norm_eps", where)),
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                      attention_bias=bool(c.get("attention_bias", False)),
                      mlp_bias=bool(c.get("mlp_bias", False)))
  cfg.validate(where)
  return cfg


# PhiConfig's hidden_act for Phi-1/1.5/2; both names are the tanh approximation of GELU.
_PHI_ACTS = ("gelu_new", "gelu_pytorch_tanh")


def _phi_config_from_hf(c: Mapping[str, Any], where: str) -> DecoderConfig:
  """PhiConfig dict -> DecoderConfig(family="phi"); PhiForCausalLM's lm_head has a bias.

  partial_rotary_factor is required (top level in 4.x, rope_parameters in 5.x): PhiConfig
  silently defaults it to 0.5 while Phi-2 uses 0.4.
  """
  act = c.get("hidden_act")
  _expect(act in _PHI_ACTS, f"{where}.hidden_act", f"{act!r}: only {_PHI_ACTS} are supported")
  _expect(not c.get("qk_layernorm"), f"{where}.qk_layernorm",
          "query/key LayerNorm is not implemented")
  factor = _rope_value(c, "partial_rotary_factor", where)
  _expect(factor is not None, f"{where}.partial_rotary_factor",
          f"missing (neither {where}.partial_rotary_factor nor "
          f"{where}.rope_parameters.partial_rotary_factor is set)")
  width, heads = _req(c, "hidden_size", where), _req(c, "num_attention_heads", where)
  cfg = DecoderConfig(vocab_size=_req(c, "vocab_size", where), width=width,
                      depth=_req(c, "num_hidden_layers", where), heads=heads,
                      kv_heads=c.get("num_key_value_heads") or heads,
                      head_dim=_head_dim(c, width, heads),
                      mlp_dim=_req(c, "intermediate_size", where),
                      rope_theta=rope_theta_from_hf(c, where),
                      norm_eps=float(_req(c, "layer_norm_eps", where)),
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                      family="phi", norm="layer", mlp="gelu", parallel_block=True,
                      rotary_fraction=factor, attention_bias=True, mlp_bias=True,
                      lm_head_bias=True)
  cfg.validate(where)
  return cfg


def model_config_from_hf_llava(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """LlavaConfig dict -> ModelConfig (float32, mlp2x_gelu); `overrides` replace fields.

  vision_feature_select_strategy "default" -> patch, "full" -> cls_patch for CLIP; SigLIP has
  no class token: "full" -> patch, and "default" (HF drops the first patch) is refused.
  Embeddings are tied if either the top level or text_config says so (as LlavaConfig does).
  The decoder family follows text_config.model_type; the lm_head never has a bias (5.x
  LlavaForConditionalGeneration builds its own, bias-free, even over a Phi text model).
  """
  c = hf_config
  layer = c.get("vision_feature_layer", -2)
  _expect(isinstance(layer, int), "vision_feature_layer",
          f"{layer!r}: only a single layer is supported")
  strategy = c.get("vision_feature_select_strategy", "default")
  _expect(strategy in ("default", "full"), "vision_feature_select_strategy", repr(strategy))
  vc = _req(c, "vision_config", "config")
  siglip = vc.get("model_type") == "siglip_vision_model"
  _expect(not (siglip and strategy == "default"), "vision_feature_select_strategy",
          "'default' drops SigLIP's first patch (it has no class token); not supported")
  select = "cls_patch" if strategy == "full" and not siglip else "patch"
  _expect(c.get("projector_hidden_act", "gelu") == "gelu", "projector_hidden_act",
          "only gelu is supported")
  _expect(c.get("multimodal_projector_bias", True), "multimodal_projector_bias",
          "a projector without bias is not supported")
  token = c.get("image_token_index", c.get("image_token_id"))
  _expect(token is not None, "image_token_index", "missing (nor is image_token_id set)")
  decoder = decoder_config_from_hf(_req(c, "text_config", "config"))
  tie = decoder.tie_embeddings or bool(c.get("tie_word_embeddings", False))
  cfg = ModelConfig(
      vision=vision_config_from_hf(vc, feature_layer=layer, feature_select=select),
      projector=ProjectorConfig(kind="mlp2x_gelu"),
      decoder=dataclasses.replace(decoder, tie_embeddings=tie, lm_head_bias=False),
      image_token_id=int(token), dtype="float32")
  cfg = dataclasses.replace(cfg, **overrides)
  cfg.validate("model")
  return cfg


# ----------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor `hf` [hf_shape] <-> one mm_jax parameter `path` [mm_shape].

  op: "copy" (reshape only), "t" (Linear weight: transpose, then reshape) or "conv"
  (patch conv [D, C, p, p] <-> [p, p, C, D]).
  """

  hf: str
  path: Path
  op: str
  hf_shape: tuple[int, ...]
  mm_shape: tuple[int, ...]

  def to_mm(self, x: np.ndarray) -> np.ndarray:
    x = x.T if self.op == "t" else x.transpose(2, 3, 1, 0) if self.op == "conv" else x
    return np.ascontiguousarray(x.reshape(self.mm_shape))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.op == "t":
      return np.ascontiguousarray(x.reshape(self.hf_shape[::-1]).T)
    if self.op == "conv":
      return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x.reshape(self.hf_shape)


def _linear(hf: str, path: Path, d_in: tuple[int, ...], d_out: tuple[int, ...],
            bias: bool) -> list[Rule]:
  """HF Linear weight [prod(out), prod(in)] (+ bias) <-> Dense kernel [*in, *out] (+ bias)."""
  n_in, n_out = math.prod(d_in), math.prod(d_out)
  rules = [Rule(f"{hf}.weight", (*path, "kernel"), "t", (n_out, n_in), d_in + d_out)]
  if bias:
    rules.append(Rule(f"{hf}.bias", (*path, "bias"), "copy", (n_out,), d_out))
  return rules


def _norm(hf: str, path: Path, d: int, bias: bool) -> list[Rule]:
  """LayerNorm / RMSNorm: weight -> scale (and bias)."""
  rules = [Rule(f"{hf}.weight", (*path, "scale"), "copy", (d,), (d,))]
  if bias:
    rules.append(Rule(f"{hf}.bias", (*path, "bias"), "copy", (d,), (d,)))
  return rules


def vision_rules(cfg: VisionConfig) -> list[Rule]:
  """CLIPVisionModel / SiglipVisionModel (5.x keys, no `vision_model.`) <-> VisionTower."""
  d, n, p, clip = cfg.width, cfg.heads, cfg.patch_size, cfg.kind == "clip"
  nh = (n, d // n)
  rules = [Rule("embeddings.patch_embedding.weight", ("patch", "kernel"), "conv",
                (d, 3, p, p), (p, p, 3, d)),
           Rule("embeddings.position_embedding.weight", ("pos",), "copy",
                (cfg.num_patches + clip, d), (cfg.num_patches + clip, d))]
  if clip:
    rules += [Rule("embeddings.class_embedding", ("cls",), "copy", (d,), (d,)),
              *_norm("pre_layrnorm", ("pre_ln",), d, bias=True)]
  else:
    rules.append(Rule("embeddings.patch_embedding.bias", ("patch", "bias"), "copy", (d,), (d,)))
  for i in range(cfg.depth):
    hf, at = f"encoder.layers.{i}", ("blocks", i)
    rules += [*_norm(f"{hf}.layer_norm1", (*at, "ln1"), d, bias=True),
              *_norm(f"{hf}.layer_norm2", (*at, "ln2"), d, bias=True),
              *_linear(f"{hf}.self_attn.out_proj", (*at, "o"), nh, (d,), bias=True),
              *_linear(f"{hf}.mlp.fc1", (*at, "fc1"), (d,), (cfg.mlp_dim,), bias=True),
              *_linear(f"{hf}.mlp.fc2", (*at, "fc2"), (cfg.mlp_dim,), (d,), bias=True)]
    rules += [r for x in "qkv" for r in _linear(f"{hf}.self_attn.{x}_proj", (*at, x), (d,), nh,
                                                bias=True)]
  return rules + _norm("post_layernorm", ("post_ln",), d, bias=True)


def projector_rules(cfg: ProjectorConfig, d_in: int, d_out: int) -> list[Rule]:
  """LlavaMultiModalProjector (linear_1, gelu, linear_2) <-> Projector (mlp2x_gelu only)."""
  _expect(cfg.kind == "mlp2x_gelu", "projector.kind",
          f"{cfg.kind!r} has no Hugging Face LLaVA counterpart (mlp2x_gelu only)")
  return (_linear("linear_1", ("fc1",), (d_in,), (d_out,), bias=True)
          + _linear("linear_2", ("fc2",), (d_out,), (d_out,), bias=True))


def _attention(hf: str, at: Path, cfg: DecoderConfig, out: str) -> list[Rule]:
  """q/k/v/`out` projections of one layer (`hf`: its self_attn prefix)."""
  d, h, bias = cfg.width, cfg.head_size, cfg.attention_bias
  return [*_linear(f"{hf}.q_proj", (*at, "q"), (d,), (cfg.heads, h), bias),
          *_linear(f"{hf}.k_proj", (*at, "k"), (d,), (cfg.kv_heads, h), bias),
          *_linear(f"{hf}.v_proj", (*at, "v"), (d,), (cfg.kv_heads, h), bias),
          *_linear(f"{hf}.{out}", (*at, "o"), (cfg.heads, h), (d,), bias)]


def _lm_head(cfg: DecoderConfig) -> list[Rule]:
  """lm_head weight (unless tied) and bias; a tied head keeps its bias as `lm_bias`."""
  d, v = cfg.width, cfg.vocab_size
  if not cfg.tie_embeddings:
    return _linear("lm_head", ("lm_head",), (d,), (v,), cfg.lm_head_bias)
  return [Rule("lm_head.bias", ("lm_bias",), "copy", (v,), (v,))] if cfg.lm_head_bias else []


def llama_rules(cfg: DecoderConfig) -> list[Rule]:
  """LlamaForCausalLM (`model.*`, `lm_head.weight` unless tied) <-> Decoder."""
  d, f, b = cfg.width, cfg.mlp_dim, cfg.mlp_bias
  v = cfg.vocab_size
  rules = [Rule("model.embed_tokens.weight", ("embedding",), "copy", (v, d), (v, d)),
           *_norm("model.norm", ("norm",), d, bias=False)]
  for i in range(cfg.depth):
    hf, at = f"model.layers.{i}", ("layers", i)
    rules += [*_norm(f"{hf}.input_layernorm", (*at, "attn_norm"), d, bias=False),
              *_norm(f"{hf}.post_attention_layernorm", (*at, "mlp_norm"), d, bias=False),
              *_attention(f"{hf}.self_attn", at, cfg, "o_proj"),
              *_linear(f"{hf}.mlp.gate_proj", (*at, "gate"), (d,), (f,), b),
              *_linear(f"{hf}.mlp.up_proj", (*at, "up"), (d,), (f,), b),
              *_linear(f"{hf}.mlp.down_proj", (*at, "down"), (f,), (d,), b)]
  return rules + _lm_head(cfg)


def phi_rules(cfg: DecoderConfig) -> list[Rule]:
  """PhiForCausalLM (`model.*`, `lm_head.weight` unless tied, `lm_head.bias`) <-> Decoder.

  One LayerNorm per layer (input_layernorm, shared by attention and MLP), `dense` is the
  output projection, `model.final_layernorm` the final norm.
  """
  d, f, v = cfg.width, cfg.mlp_dim, cfg.vocab_size
  rules = [Rule("model.embed_tokens.weight", ("embedding",), "copy", (v, d), (v, d)),
           *_norm("model.final_layernorm", ("norm",), d, bias=True)]
  for i in range(cfg.depth):
    hf, at = f"model.layers.{i}", ("layers", i)
    rules += [*_norm(f"{hf}.input_layernorm", (*at, "attn_norm"), d, bias=True),
              *_attention(f"{hf}.self_attn", at, cfg, "dense"),
              *_linear(f"{hf}.mlp.fc1", (*at, "fc1"), (d,), (f,), bias=True),
              *_linear(f"{hf}.mlp.fc2", (*at, "fc2"), (f,), (d,), bias=True)]
  return rules + _lm_head(cfg)


def decoder_rules(cfg: DecoderConfig) -> list[Rule]:
  """The *ForCausalLM rules of `cfg.family`."""
  return phi_rules(cfg) if cfg.family == "phi" else llama_rules(cfg)


def _prefixed(rules: Sequence[Rule], hf_prefix: str, path: Path, strip: str = "") -> list[Rule]:
  """Rules with `hf_prefix` replacing a leading `strip` of each HF key and `path` prepended."""
  return [dataclasses.replace(r, hf=hf_prefix + r.hf.removeprefix(strip), path=(*path, *r.path))
          for r in rules]


def llava_rules(cfg: ModelConfig) -> list[Rule]:
  """LlavaForConditionalGeneration (5.x keys) <-> MultimodalModel, any decoder family."""
  text = decoder_rules(cfg.decoder)
  body = [r for r in text if r.hf.startswith("model.")]
  head = [r for r in text if not r.hf.startswith("model.")]
  return (_prefixed(vision_rules(cfg.vision), "model.vision_tower.", ("towers", "image"))
          + _prefixed(projector_rules(cfg.projector, cfg.vision.width, cfg.decoder.width),
                      "model.multi_modal_projector.", ("projectors", "image"))
          + _prefixed(body, "model.language_model.", ("decoder",), strip="model.")
          + _prefixed(head, "", ("decoder",)))


# ----------------------------------------------------------------------------- state dicts

# Older layouts -> transformers 5.x keys; the first matching pattern renames a key.
_RENAMES = {
    "vision": ((r"^vision_model\.", ""),),
    "llama": (),
    "phi": (),
    "llava": ((r"^(model\.)?vision_tower\.(vision_model\.)?", "model.vision_tower."),
              (r"^(model\.)?multi_modal_projector\.", "model.multi_modal_projector."),
              (r"^(language_model\.)?lm_head\.", "lm_head."),
              (r"^(model\.language_model|language_model\.model|language_model)\.",
               "model.language_model.")),
    # Whisper: the encoder of a WhisperForConditionalGeneration / WhisperModel -> bare keys.
    "whisper": ((r"^(model\.)?encoder\.", ""),),
}
# Tensors with no mm_jax counterpart: SigLIP's pooling head, buffers of older versions.
_IGNORED = re.compile(r"(^|vision_tower\.)head\.|rotary_emb\.inv_freq$|position_ids$")


def ignored(key: str) -> bool:
  """Whether a (normalised) HF key has no mm_jax counterpart and is skipped on import."""
  return bool(_IGNORED.search(key))


def normalize_keys(sd: Mapping[str, Any], family: str) -> dict[str, Any]:
  """Renames `sd`'s keys to the transformers 5.x layout of `family` (vision|llama|phi|llava|
  whisper)."""
  out: dict[str, Any] = {}
  for key, value in sd.items():
    new = next((re.sub(pat, rep, key) for pat, rep in _RENAMES[family] if re.match(pat, key)),
               key)
    if new in out:
      raise ValueError(f"{key}: renames to {new!r}, which another key already gave")
    out[new] = value
  return out


def hf_to_mm(sd: Mapping[str, Any], rules: Sequence[Rule], prefix: Path = ()) -> Flat:
  """Applies `rules` to a (normalised) HF state dict; every non-ignored key must be used."""
  keys = {r.hf for r in rules}
  missing = sorted(keys - set(sd))
  extra = sorted(k for k in set(sd) - keys if not ignored(k))
  if missing or extra:
    raise ValueError(f"state dict does not match the config: missing {missing[:8]} "
                     f"({len(missing)}), unexpected {extra[:8]} ({len(extra)})")
  out: Flat = {}
  for r in rules:
    x = np.asarray(sd[r.hf])
    if x.shape != r.hf_shape:
      raise ValueError(f"{r.hf}: shape {x.shape}, expected {r.hf_shape} for "
                       f"{path_str(r.path)}")
    out[(*prefix, *r.path)] = r.to_mm(x)
  if len(out) != len(rules):
    raise ValueError("two rules write the same parameter path")
  return out


def mm_to_hf(flat: Mapping[Path, Any], rules: Sequence[Rule], prefix: Path = ()) -> dict:
  """Inverse of `hf_to_mm`: mm_jax arrays at `prefix + rule.path` -> 5.x-keyed HF arrays."""
  paths = {(*prefix, *r.path) for r in rules}
  if set(flat) != paths:
    raise ValueError(f"parameters do not match the config: missing "
                     f"{[path_str(p) for p in sorted(paths - set(flat), key=str)][:8]}, "
                     f"unexpected {[path_str(p) for p in sorted(set(flat) - paths, key=str)][:8]}")
  return {r.hf: r.to_hf(np.asarray(flat[(*prefix, *r.path)])) for r in rules}


def _untie(sd: dict[str, Any], embed_key: str, tied: bool) -> dict[str, Any]:
  """Drops `lm_head.weight` of tied embeddings (state_dict() lists it) if it is the table."""
  if tied and "lm_head.weight" in sd and embed_key in sd:
    if not np.array_equal(np.asarray(sd["lm_head.weight"]), np.asarray(sd[embed_key])):
      raise ValueError("lm_head.weight differs from the embedding but the config ties them")
    sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
  return sd


def vision_to_mm(sd: Mapping[str, Any], cfg: VisionConfig, prefix: Path = ()) -> Flat:
  """CLIPVisionModel / SiglipVisionModel state dict -> VisionTower params under `prefix`."""
  return hf_to_mm(normalize_keys(sd, "vision"), vision_rules(cfg), prefix)


def projector_to_mm(sd: Mapping[str, Any], cfg: ProjectorConfig, d_in: int, d_out: int,
                    prefix: Path = ()) -> Flat:
  """LlavaMultiModalProjector state dict (linear_1/linear_2) -> Projector params."""
  return hf_to_mm(sd, projector_rules(cfg, d_in, d_out), prefix)


def decoder_to_mm(sd: Mapping[str, Any], cfg: DecoderConfig, prefix: Path = ()) -> Flat:
  """LlamaForCausalLM / PhiForCausalLM (per cfg.family) state dict -> Decoder params."""
  sd = _untie(normalize_keys(sd, cfg.family), "model.embed_tokens.weight", cfg.tie_embeddings)
  return hf_to_mm(sd, decoder_rules(cfg), prefix)


def llava_to_mm(sd: Mapping[str, Any], cfg: ModelConfig) -> Flat:
  """LlavaForConditionalGeneration state dict (either layout) -> MultimodalModel params."""
  sd = normalize_keys(sd, "llava")
  sd = _untie(sd, "model.language_model.embed_tokens.weight", cfg.decoder.tie_embeddings)
  return hf_to_mm(sd, llava_rules(cfg))


def mm_to_vision(flat: Mapping[Path, Any], cfg: VisionConfig, prefix: Path = ()) -> dict:
  return mm_to_hf(flat, vision_rules(cfg), prefix)


def mm_to_decoder(flat: Mapping[Path, Any], cfg: DecoderConfig, prefix: Path = ()) -> dict:
  return mm_to_hf(flat, decoder_rules(cfg), prefix)


def mm_to_llava(flat: Mapping[Path, Any], cfg: ModelConfig) -> dict:
  """MultimodalModel params -> LlavaForConditionalGeneration state dict (5.x keys)."""
  return mm_to_hf(flat, llava_rules(cfg))


# ----------------------------------------------------------------------------- nnx models


def path_str(path: Path) -> str:
  return "/".join(map(str, path))


def flat_params(model: nnx.Module) -> Flat:
  """Every nnx.Param of `model` as numpy, keyed by its path."""
  return {p: np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _place(x: Any, like: Any) -> jax.Array:
  """x as a jax array with `like`'s dtype and sharding (if `like` has one)."""
  x = np.asarray(x, like.dtype)
  sharding = getattr(like, "sharding", None)
  return jax.device_put(x, sharding) if sharding is not None else jax.numpy.asarray(x)


def load_flat_into(model: nnx.Module, flat: Mapping[Path, Any]) -> None:
  """Sets every nnx.Param of `model` from `flat` (cast to the param's dtype, same sharding).

  `model` may be abstract (`nnx.eval_shape(lambda: Model(...))`): no random init is paid.
  Raises if a parameter is missing, a key names no parameter, or a shape differs.
  """
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  missing = sorted(map(path_str, set(params) - set(flat)))
  extra = sorted(map(path_str, set(flat) - set(params)))
  if missing or extra:
    raise ValueError(f"parameters not covered: {missing[:8]} ({len(missing)}); "
                     f"unknown paths: {extra[:8]} ({len(extra)})")
  for path, var in params.items():
    if tuple(np.shape(flat[path])) != tuple(var.shape):
      raise ValueError(f"{path_str(path)}: shape {np.shape(flat[path])}, model has {var.shape}")
  new = [(p, v.replace(_place(flat[p], v.get_value()))) for p, v in params.items()]
  nnx.update(model, nnx.from_flat_state(new))
