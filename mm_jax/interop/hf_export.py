"""A trained MultimodalModel -> a Hugging Face LlavaForConditionalGeneration folder (LLaMA or
Phi text_config, after config.model.decoder.family).

Writes config.json, generation_config.json, safetensors shards (+ index), the tokenizer
(tokenizer.json / tokenizer.model / tokenizer_config.json / special_tokens_map.json) and
preprocessor_config.json / processor_config.json, so that transformers' `from_pretrained`
and `AutoProcessor` load it. Weights use the published llava-hf key layout
(`vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.weight`),
which transformers 4.4x and 5.x both load.

Placeholder id: mm_jax lets `image_token_id` sit outside the vocabulary (tiny: 128 with
V = 128; 7b: 32000 with V = 32000), but transformers' LlavaModel looks every input id up
in the embedding table before it scatters image features over the placeholders
(modeling_llava.py: `inputs_embeds = self.get_input_embeddings()(input_ids)`). The export
then grows the embedding table and lm_head by zero rows to V' = image_token_id + 1
(text_config.vocab_size = V'): logits over the first V ids are unchanged, the extra ones
are 0. `config.init.llava_from_hf` of such a folder drops those rows again.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from mm_jax.config import Config, ConfigError, ModelConfig
from mm_jax.interop import hf_config as hc
from mm_jax.interop import hf_import, hf_tokenizer, safetensors_io
from mm_jax.interop import hf_mapping as hm
from mm_jax.models.multimodal import MultimodalModel

# 5.x keys (hf_mapping) -> the published llava-hf layout.
_LAYOUT = (("model.vision_tower.", "vision_tower.vision_model."),
           ("model.multi_modal_projector.", "multi_modal_projector."),
           ("model.language_model.", "language_model.model."),
           ("lm_head.", "language_model.lm_head."))


def check_exportable(cfg: ModelConfig) -> None:
  """Only what LlavaForConditionalGeneration expresses: mlp2x_gelu, a LLaMA or Phi decoder
  with a bias-free lm_head."""
  if tuple(cfg.modalities) != ("image",):
    raise ConfigError(f"config.model.modalities: {cfg.modalities}; the LLaVA format holds "
                      "images only (video and audio towers have no counterpart there)")
  if cfg.projector.kind != "mlp2x_gelu":
    raise ConfigError(f"config.model.projector.kind: {cfg.projector.kind!r} has no "
                      "LlavaForConditionalGeneration counterpart (export needs mlp2x_gelu)")
  d = cfg.decoder
  if d.lm_head_bias:  # 5.x builds its own nn.Linear(bias=False) over any text model
    raise ConfigError("config.model.decoder.lm_head_bias: LlavaForConditionalGeneration's "
                      "lm_head has no bias; a model trained with one does not export")
  if d.family == "phi" and d.head_size != d.width // d.heads:
    # transformers 4.x PhiAttention derives the head size from hidden_size alone.
    raise ConfigError(f"config.model.decoder.head_dim: {d.head_dim} != width // heads; a "
                      "Phi text model needs the default head size")


def _text_config(cfg: ModelConfig, special: dict[str, int | None], max_positions: int) -> dict:
  """text_config: LlamaConfig or PhiConfig fields. RoPE values sit both at the top (4.x
  reads them there) and in rope_parameters (5.x)."""
  d = cfg.decoder
  common = dict(vocab_size=hm.grown_vocab(cfg), hidden_size=d.width,
                intermediate_size=d.mlp_dim, num_hidden_layers=d.depth,
                num_attention_heads=d.heads, num_key_value_heads=d.kv_heads,
                rope_theta=d.rope_theta, max_position_embeddings=max_positions,
                tie_word_embeddings=d.tie_embeddings, **special)
  rope = {"rope_type": "default", "rope_theta": d.rope_theta}
  if d.family == "phi":
    return dict(model_type="phi", hidden_act="gelu_new", layer_norm_eps=d.norm_eps,
                partial_rotary_factor=d.rotary_fraction, qk_layernorm=False,
                rope_parameters={**rope, "partial_rotary_factor": d.rotary_fraction},
                **common)
  return dict(model_type="llama", head_dim=d.head_size, hidden_act="silu",
              rms_norm_eps=d.norm_eps, rope_parameters=rope,
              attention_bias=d.attention_bias, mlp_bias=d.mlp_bias, **common)


def _published(key: str) -> str:
  for new, old in _LAYOUT:
    if key.startswith(new):
      return old + key.removeprefix(new)
  return key


def llava_config(cfg: ModelConfig, dtype: str, special: dict[str, int | None],
                 max_positions: int) -> dict:
  """The LlavaConfig dict (transformers 5.x field names, readable by 4.4x) of `cfg`."""
  v, d = cfg.vision, cfg.decoder
  siglip = v.kind == "siglip"
  text = _text_config(cfg, special, max_positions)
  vision = dict(model_type="siglip_vision_model" if siglip else "clip_vision_model",
                hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                num_channels=3, layer_norm_eps=v.layer_norm_eps,
                hidden_act="gelu_pytorch_tanh" if siglip else "quick_gelu")
  # HF "default" drops the first row (CLIP's class token); SigLIP has none, so "full".
  strategy = "full" if siglip or v.feature_select == "cls_patch" else "default"
  return dict(architectures=["LlavaForConditionalGeneration"], model_type="llava",
              text_config=text, vision_config=vision, image_token_index=cfg.image_token_id,
              image_seq_length=v.tokens_per_image, vision_feature_layer=v.feature_layer,
              vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
              multimodal_projector_bias=True, tie_word_embeddings=d.tie_embeddings,
              dtype=dtype, **special)


def _check_roundtrip(cfg: ModelConfig, hf: dict, path: str) -> None:
  """The written config must read back (hf_mapping) to the shapes being exported."""
  back = hc.model_config_from_hf_llava(hf_import.complete(hf))
  for ours, theirs, keys, where in (
      (cfg.vision, back.vision, {**hf_import.VISION_KEYS, **hf_import.LLAVA_VISION_KEYS},
       "vision"),
      (cfg.decoder, back.decoder, {k: v for k, v in
                                   hf_import.decoder_keys(cfg.decoder.family).items()
                                   if k != "vocab_size"}, "decoder")):
    hf_import.compare(ours, theirs, keys, f"config.model.{where}", path)


def write_weights(model: MultimodalModel, cfg: ModelConfig, out: str, dtype: np.dtype,
                  max_shard_bytes: int) -> list[str]:
  """Safetensors shards, one tensor gathered to this host at a time."""
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  rules = {r.hf: r for r in hm.llava_rules(cfg)}
  missing = sorted(hm.path_str(r.path) for r in rules.values() if r.path not in params)
  if missing:
    raise ValueError(f"the model lacks parameters the export needs: {missing[:8]}")
  rows = hm.grown_vocab(cfg)

  def shape(key: str) -> tuple[int, ...]:
    s = rules[key].hf_shape
    return (rows, *s[1:]) if key in hm.VOCAB_ROWS else s

  def fetch(key: str) -> np.ndarray:
    r = rules[key]
    x = r.to_hf(np.asarray(jax.device_get(params[r.path].get_value()), np.float32))
    if key in hm.VOCAB_ROWS and rows > x.shape[0]:
      x = np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
    return x.astype(dtype)

  specs = [(_published(k), shape(k), dtype) for k in rules]
  by_name = {_published(k): k for k in rules}
  return safetensors_io.write_folder(out, specs, lambda name: fetch(by_name[name]),
                                     max_shard_bytes=max_shard_bytes)


def _json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def preprocessor_config(cfg: ModelConfig) -> dict:
  """CLIPImageProcessor at the tower's size: resize to S, crop S x S (a no-op on the square
  images the LLaVA-1.5 pad/resize path produces), rescale 1/255, the tower's mean/std."""
  v = cfg.vision
  return dict(image_processor_type="CLIPImageProcessor", do_resize=True,
              size={"shortest_edge": v.image_size}, do_center_crop=True,
              crop_size={"height": v.image_size, "width": v.image_size}, resample=3,
              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
              image_mean=list(v.mean), image_std=list(v.std), do_convert_rgb=True)


def processor_config(cfg: ModelConfig) -> dict:
  v = cfg.vision
  return dict(processor_class="LlavaProcessor", image_token=hf_tokenizer.IMAGE_TOKEN,
              patch_size=v.patch_size, vision_feature_select_strategy=(
                  "full" if v.kind == "siglip" or v.feature_select == "cls_patch"
                  else "default"), num_additional_image_tokens=int(v.kind == "clip"))


def export_model(model: MultimodalModel, cfg: Config, out: str, *, dtype: str = "",
                 max_shard_bytes: int = 2 * 10**9) -> list[str]:
  """Writes the Hugging Face folder `out` for `model` (shapes from `cfg.model`); `dtype`
  (float32 | bfloat16 | float16) defaults to the parameter dtype. Returns the files."""
  check_exportable(cfg.model)
  # write_weights takes the rules' paths only: adapters would silently not be exported.
  adapters = [hm.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
  if adapters:
    raise ValueError(f"the model has unmerged LoRA adapters ({adapters[0]}, ...): fold them "
                     "in with mm_jax.models.lora.merge first (`hf export` does)")
  dtype = dtype or cfg.model.param_dtype
  os.makedirs(out, exist_ok=True)
  special = hf_tokenizer.write(cfg, out)
  hf = llava_config(cfg.model, dtype, special, cfg.data.seq_len)
  _check_roundtrip(cfg.model, hf, os.path.join(out, "config.json"))
  files = write_weights(model, cfg.model, out, np.dtype(jax.numpy.dtype(dtype)),
                        max_shard_bytes)
  _json(os.path.join(out, "config.json"), hf)
  _json(os.path.join(out, "generation_config.json"),
        {k: v for k, v in special.items() if v is not None})
  _json(os.path.join(out, "preprocessor_config.json"), preprocessor_config(cfg.model))
  _json(os.path.join(out, "processor_config.json"), processor_config(cfg.model))
  return sorted(set(files) | set(os.listdir(out)))

