"""Hugging Face configs -> mm_jax configs, pure Python (no torch import).

Readers take `PretrainedConfig.to_dict()` (complete) dicts and fail naming the key that is
missing or unsupported; they never fall back silently where the numerics would change.
Parameters (the `Rule` lists and state-dict conversion) live in hf_mapping.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mm_jax.config import ConfigError, DecoderConfig, ModelConfig, ProjectorConfig, VisionConfig

_VISION_KINDS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_VISION_ACTS = {"clip": ("quick_gelu",), "siglip": ("gelu_pytorch_tanh", "gelu_new")}
_VISION_EPS = {"clip": 1e-5, "siglip": 1e-6}  # CLIPVisionConfig / SiglipVisionConfig defaults
_SIGLIP_MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def req(cfg: Mapping[str, Any], key: str, where: str) -> Any:
  """cfg[key], or a ConfigError naming `where.key`."""
  if cfg.get(key) is None:
    raise ConfigError(f"{where}.{key}: missing from the Hugging Face config "
                      "(pass a complete `PretrainedConfig.to_dict()`)")
  return cfg[key]


def expect(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{key}: {msg}")


def vision_config_from_hf(hf_vision_config: Mapping[str, Any], where: str = "vision_config",
                          **overrides: Any) -> VisionConfig:
  """CLIPVisionConfig / SiglipVisionConfig dict -> VisionConfig (`overrides` replace fields).

  SigLIP gets mean = std = 0.5 (its image processor's); pass mean/std to override.
  """
  c = hf_vision_config
  kind = _VISION_KINDS.get(req(c, "model_type", where))
  expect(kind is not None, f"{where}.model_type",
          f"{c['model_type']!r} is not one of {sorted(_VISION_KINDS)}")
  act = c.get("hidden_act", _VISION_ACTS[kind][0])
  expect(act in _VISION_ACTS[kind], f"{where}.hidden_act", f"{act!r} unsupported for {kind}")
  expect(c.get("num_channels", 3) == 3, f"{where}.num_channels", "only RGB (3) is supported")
  fields = dict(kind=kind, image_size=req(c, "image_size", where),
                patch_size=req(c, "patch_size", where), width=req(c, "hidden_size", where),
                depth=req(c, "num_hidden_layers", where),
                heads=req(c, "num_attention_heads", where),
                mlp_dim=req(c, "intermediate_size", where),
                layer_norm_eps=float(c.get("layer_norm_eps", _VISION_EPS[kind])),
                **(_SIGLIP_MEAN_STD if kind == "siglip" else {}))
  cfg = VisionConfig(**{**fields, **overrides})
  cfg.validate(where)
  return cfg


def _rope_value(c: Mapping[str, Any], key: str, where: str) -> float | None:
  """`key` from the top level (4.x) or `rope_parameters` (5.x); None if in neither."""
  params = c.get("rope_parameters") or {}
  found = {float(v) for v in (c.get(key), params.get(key)) if v is not None}
  expect(len(found) <= 1, f"{where}.{key}", f"conflicts with rope_parameters.{key}")
  return found.pop() if found else None


def rope_theta_from_hf(hf_text_config: Mapping[str, Any], where: str = "text_config") -> float:
  """`rope_theta` from the top level (4.x) or `rope_parameters` (5.x); unscaled RoPE only."""
  c = hf_text_config
  params = c.get("rope_parameters") or {}
  scaling = c.get("rope_scaling") or {}
  rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
  expect(rope_type in (None, "default"), f"{where}.rope_parameters.rope_type",
          f"{rope_type!r} RoPE scaling is not implemented (only default)")
  theta = _rope_value(c, "rope_theta", where)
  expect(theta is not None, f"{where}.rope_theta",
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
  expect(c.get("hidden_act", "silu") == "silu", f"{where}.hidden_act", "only silu is supported")
  factor = _rope_value(c, "partial_rotary_factor", where)
  expect(factor in (None, 1.0), f"{where}.partial_rotary_factor",
          f"{factor}: partial rotary is implemented for model_type phi only")
  cfg = DecoderConfig(**_shape_fields(c, where),
                      norm_eps=float(req(c, "rms_norm_eps", where)),
                      attention_bias=bool(c.get("attention_bias", False)),
                      mlp_bias=bool(c.get("mlp_bias", False)))
  cfg.validate(where)
  return cfg


def _shape_fields(c: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The DecoderConfig fields that LlamaConfig and PhiConfig spell alike."""
  width, heads = req(c, "hidden_size", where), req(c, "num_attention_heads", where)
  return dict(vocab_size=req(c, "vocab_size", where), width=width,
              depth=req(c, "num_hidden_layers", where), heads=heads,
              kv_heads=c.get("num_key_value_heads") or heads,
              head_dim=_head_dim(c, width, heads), mlp_dim=req(c, "intermediate_size", where),
              rope_theta=rope_theta_from_hf(c, where),
              tie_embeddings=bool(c.get("tie_word_embeddings", False)))


# PhiConfig's hidden_act for Phi-1/1.5/2; both names are the tanh approximation of GELU.
_PHI_ACTS = ("gelu_new", "gelu_pytorch_tanh")


def _phi_config_from_hf(c: Mapping[str, Any], where: str) -> DecoderConfig:
  """PhiConfig dict -> DecoderConfig(family="phi"); PhiForCausalLM's lm_head has a bias.

  partial_rotary_factor is required (top level in 4.x, rope_parameters in 5.x): PhiConfig
  silently defaults it to 0.5 while Phi-2 uses 0.4.
  """
  act = c.get("hidden_act")
  expect(act in _PHI_ACTS, f"{where}.hidden_act", f"{act!r}: only {_PHI_ACTS} are supported")
  expect(not c.get("qk_layernorm"), f"{where}.qk_layernorm",
          "query/key LayerNorm is not implemented")
  factor = _rope_value(c, "partial_rotary_factor", where)
  expect(factor is not None, f"{where}.partial_rotary_factor",
          f"missing (neither {where}.partial_rotary_factor nor "
          f"{where}.rope_parameters.partial_rotary_factor is set)")
  cfg = DecoderConfig(**_shape_fields(c, where),
                      norm_eps=float(req(c, "layer_norm_eps", where)),
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
  expect(isinstance(layer, int), "vision_feature_layer",
          f"{layer!r}: only a single layer is supported")
  strategy = c.get("vision_feature_select_strategy", "default")
  expect(strategy in ("default", "full"), "vision_feature_select_strategy", repr(strategy))
  vc = req(c, "vision_config", "config")
  siglip = vc.get("model_type") == "siglip_vision_model"
  expect(not (siglip and strategy == "default"), "vision_feature_select_strategy",
          "'default' drops SigLIP's first patch (it has no class token); not supported")
  select = "cls_patch" if strategy == "full" and not siglip else "patch"
  expect(c.get("projector_hidden_act", "gelu") == "gelu", "projector_hidden_act",
          "only gelu is supported")
  expect(c.get("multimodal_projector_bias", True), "multimodal_projector_bias",
          "a projector without bias is not supported")
  token = c.get("image_token_index", c.get("image_token_id"))
  expect(token is not None, "image_token_index", "missing (nor is image_token_id set)")
  decoder = decoder_config_from_hf(req(c, "text_config", "config"))
  tie = decoder.tie_embeddings or bool(c.get("tie_word_embeddings", False))
  cfg = ModelConfig(
      vision=vision_config_from_hf(vc, feature_layer=layer, feature_select=select),
      projector=ProjectorConfig(kind="mlp2x_gelu"),
      decoder=dataclasses.replace(decoder, tie_embeddings=tie, lm_head_bias=False),
      image_token_id=int(token), dtype="float32")
  cfg = dataclasses.replace(cfg, **overrides)
  cfg.validate("model")
  return cfg
