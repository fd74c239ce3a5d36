"""A trained MultimodalModel -> a Hugging Face LlavaForConditionalGeneration folder, or a
LlavaNextVideoForConditionalGeneration one for a video model (LLaMA or Phi text_config,
after config.model.decoder.family); `export_kind` says which, or why neither.

Writes config.json, generation_config.json and chat_template.jinja (hf_chat.py),
safetensors shards (+ index), the tokenizer (tokenizer.json / tokenizer.model /
tokenizer_config.json / special_tokens_map.json) and preprocessor_config.json /
processor_config.json (+ video_preprocessor_config.json), so that transformers'
`from_pretrained` and `AutoProcessor` load it. Weights use the published llava-hf key layout
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

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from mm_jax.config import Config, ConfigError, ModelConfig
from mm_jax.interop import hf_chat, hf_import, hf_tokenizer, safetensors_io
from mm_jax.interop import hf_config as hc
from mm_jax.interop import hf_mapping as hm
from mm_jax.models import stack
from mm_jax.models.multimodal import MultimodalModel

VIDEO_TOKEN = "<video>"

# 5.x keys (hf_mapping) -> the published llava-hf layout.
_LAYOUT = (("model.vision_tower.", "vision_tower.vision_model."),
           ("model.multi_modal_projector.", "multi_modal_projector."),
           ("model.language_model.", "language_model.model."),
           ("lm_head.", "language_model.lm_head."))


# What each HF class can hold; named in every refusal.
EXPORTABLE = ("modalities ('image',) -> LlavaForConditionalGeneration; ('video',) or "
              "('image', 'video') with video.tower=shared and video.projector=shared -> "
              "LlavaNextVideoForConditionalGeneration")


def export_kind(cfg: ModelConfig) -> str:
  """"llava" or "llava_next_video": the transformers class `cfg` exports to (mlp2x_gelu, a
  LLaMA or Phi decoder with a bias-free lm_head); ConfigError naming the key otherwise.

  Audio is refused. No transformers class pairs a CLIP/SigLIP tower and a Whisper encoder
  with one LLaMA/Phi decoder: Qwen2-Audio holds a Whisper encoder (our audio tower's layout:
  pooling before the final LayerNorm, a linear projector) but no vision tower and a Qwen2
  decoder; Qwen2.5-Omni's vision tower is Qwen2.5-VL's (windowed attention, 2-D rotary
  positions, 14-pixel patches merged 2x2, temporal patches of 2 frames), which a CLIP or
  SigLIP ViT's weights do not express.
  """
  mods = tuple(cfg.modalities)
  if "audio" in mods:
    raise ConfigError(f"config.model.modalities: {mods}: no transformers class holds an "
                      "audio tower beside a ViT and a LLaMA/Phi decoder (Qwen2-Audio has no "
                      "vision tower, Qwen2.5-Omni's is Qwen2.5-VL's); exportable: "
                      + EXPORTABLE)
  kind = "llava" if mods == ("image",) else "llava_next_video"
  if kind == "llava_next_video":
    for key in ("tower", "projector"):
      if "image" in mods and getattr(cfg.video, key) != "shared":
        raise ConfigError(f"config.model.video.{key}: {getattr(cfg.video, key)!r}: "
                          f"LlavaNextVideoForConditionalGeneration has one {key} for images "
                          f"and video; exportable: " + EXPORTABLE)
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
  return kind


def check_exportable(cfg: ModelConfig) -> None:
  export_kind(cfg)


def exportable(cfg: ModelConfig) -> bool:
  """Whether the export accepts `cfg` (a finished run offers the export command only then)."""
  try:
    export_kind(cfg)
  except ConfigError:
    return False
  return True


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


def _vision_config(v) -> dict:
  siglip = v.kind == "siglip"
  out = dict(model_type="siglip_vision_model" if siglip else "clip_vision_model",
             hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
             num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
             num_channels=3, layer_norm_eps=v.layer_norm_eps,
             hidden_act="gelu_pytorch_tanh" if siglip else "quick_gelu")
  if siglip:  # LLaVA reads hidden states, never the attention-pool head: none is built
    out["vision_use_head"] = False
  return out


def _strategy(v) -> str:
  # HF "default" drops the first row (CLIP's class token); SigLIP has none, so "full".
  return "full" if v.kind == "siglip" or v.feature_select == "cls_patch" else "default"


def llava_config(cfg: ModelConfig, dtype: str, special: dict[str, int | None],
                 max_positions: int) -> dict:
  """The LlavaConfig dict (transformers 5.x field names, readable by 4.4x) of `cfg`."""
  v, d = cfg.vision, cfg.decoder
  return dict(architectures=["LlavaForConditionalGeneration"], model_type="llava",
              text_config=_text_config(cfg, special, max_positions),
              vision_config=_vision_config(v), image_token_index=cfg.image_token_id,
              image_seq_length=v.tokens_per_image, vision_feature_layer=v.feature_layer,
              vision_feature_select_strategy=_strategy(v), projector_hidden_act="gelu",
              multimodal_projector_bias=True, tie_word_embeddings=d.tie_embeddings,
              dtype=dtype, **special)


def llava_next_video_config(cfg: ModelConfig, dtype: str, special: dict[str, int | None],
                            max_positions: int) -> dict:
  """LlavaNextVideoConfig: our video path is its video path (the tower's patch features,
  AvgPool2d(spatial_pool_stride), the shared projector). Its image path is LLaVA-NeXT's
  (anyres tiles + image_newline, here one S x S pinpoint and a zero newline), not ours."""
  v = cfg.vision
  grid = v.image_size // v.patch_size // cfg.video.pool
  out = llava_config(cfg, dtype, special, max_positions)
  out.update(architectures=["LlavaNextVideoForConditionalGeneration"],
             model_type="llava_next_video", video_token_index=cfg.video_token_id,
             image_grid_pinpoints=[[v.image_size, v.image_size]],
             spatial_pool_mode="average", spatial_pool_stride=cfg.video.pool,
             video_seq_length=grid * grid)
  return out


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
  """Safetensors shards, one tensor gathered to this host at a time (a scanned stack's
  layer is sliced on its devices first, so only that layer's tensor ever moves)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  params = {p: (lambda v=v: v.get_value()) for p, v in flat}
  params.update({p: (lambda v=params[s], i=i: v()[i])
                 for p, (s, i) in stack.layer_index(flat).items()})
  rules = {r.hf: r for r in export_rules(cfg)}
  missing = sorted(hm.path_str(r.path) for r in rules.values() if r.path not in params)
  if missing:
    raise ValueError(f"the model lacks parameters the export needs: {missing[:8]}")
  rows = hm.grown_vocab(cfg)

  def shape(key: str) -> tuple[int, ...]:
    s = rules[key].hf_shape
    return (rows, *s[1:]) if key in hm.VOCAB_ROWS else s

  def fetch(key: str) -> np.ndarray:
    r = rules[key]
    x = r.to_hf(np.asarray(jax.device_get(params[r.path]()), np.float32))
    if key in hm.VOCAB_ROWS and rows > x.shape[0]:
      x = np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
    return x.astype(dtype)

  specs = [(_published(k), shape(k), dtype) for k in rules]
  by_name = {_published(k): k for k in rules}
  extra = {}
  if export_kind(cfg) == "llava_next_video":  # its image path's row separator: not ours
    extra[_NEWLINE] = np.zeros((cfg.decoder.width,), dtype)
    specs.append((_NEWLINE, extra[_NEWLINE].shape, dtype))
  return safetensors_io.write_folder(
      out, specs, lambda name: extra[name] if name in extra else fetch(by_name[name]),
      max_shard_bytes=max_shard_bytes)


_NEWLINE = "image_newline"  # LlavaNextVideo's published key (5.x: model.image_newline)


def export_rules(cfg: ModelConfig) -> list[hm.Rule]:
  """The LLaVA rules, with the tower and projector of a video-only model at the paths it
  builds them (towers/video when video.tower=separate, likewise the projector)."""
  rules = hm.llava_rules(cfg)
  if "image" in cfg.modalities:
    return rules
  names = {"towers": "image" if cfg.video.tower == "shared" else "video",
           "projectors": "image" if cfg.video.projector == "shared" else "video"}
  return [dataclasses.replace(r, path=(r.path[0], names[r.path[0]], *r.path[2:]))
          if r.path[0] in names else r for r in rules]


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
  out = dict(processor_class="LlavaProcessor", image_token=hf_tokenizer.IMAGE_TOKEN,
             patch_size=v.patch_size, vision_feature_select_strategy=_strategy(v),
             num_additional_image_tokens=int(v.kind == "clip"))
  if export_kind(cfg) == "llava_next_video":
    out.update(processor_class="LlavaNextVideoProcessor", video_token=VIDEO_TOKEN)
  return out


def video_preprocessor_config(cfg: ModelConfig) -> dict:
  """LlavaNextVideoVideoProcessor: frames resized and cropped to S x S, the tower's
  mean/std (the frames our loader samples: config.model.video.num_frames of them)."""
  image = preprocessor_config(cfg)
  del image["image_processor_type"]
  return dict(video_processor_type="LlavaNextVideoVideoProcessor", **image,
              num_frames=cfg.video.num_frames, do_sample_frames=False)


def export_model(model: MultimodalModel, cfg: Config, out: str, *, dtype: str = "",
                 max_shard_bytes: int = 2 * 10**9) -> list[str]:
  """Writes the Hugging Face folder `out` for `model` (shapes from `cfg.model`); `dtype`
  (float32 | bfloat16 | float16) defaults to the parameter dtype. Returns the files."""
  kind = export_kind(cfg.model)
  # write_weights takes the rules' paths only: adapters would silently not be exported.
  adapters = [hm.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
  if adapters:
    raise ValueError(f"the model has unmerged LoRA adapters ({adapters[0]}, ...): fold them "
                     "in with mm_jax.models.lora.merge first (`hf export` does)")
  dtype = dtype or cfg.model.param_dtype
  os.makedirs(out, exist_ok=True)
  special = hf_tokenizer.write(cfg, out)
  build = llava_config if kind == "llava" else llava_next_video_config
  hf = build(cfg.model, dtype, special, cfg.data.seq_len)
  _check_roundtrip(cfg.model, hf, os.path.join(out, "config.json"))
  files = write_weights(model, cfg.model, out, np.dtype(jax.numpy.dtype(dtype)),
                        max_shard_bytes)
  _json(os.path.join(out, "config.json"), hf)
  _write_chat(cfg, out, special)
  _json(os.path.join(out, "preprocessor_config.json"), preprocessor_config(cfg.model))
  _json(os.path.join(out, "processor_config.json"), processor_config(cfg.model))
  if kind == "llava_next_video":
    _json(os.path.join(out, "video_preprocessor_config.json"),
          video_preprocessor_config(cfg.model))
  return sorted(set(files) | set(os.listdir(out)))


def _write_chat(cfg: Config, out: str, special: dict[str, int | None]) -> None:
  """chat_template.jinja (read by tokenizer and processor), the same template in
  tokenizer_config.json (older readers) and generation_config.json."""
  from mm_jax.infer import prompts

  template = hf_chat.chat_template(cfg)
  with open(os.path.join(out, "chat_template.jinja"), "w") as f:
    f.write(template)
  path = os.path.join(out, "tokenizer_config.json")
  if os.path.isfile(path):
    with open(path) as f:
      tokenizer_config = json.load(f)
    _json(path, {**tokenizer_config, "chat_template": template})
  stops = prompts.stop_ids(cfg, prompts.tokenizer_for(cfg)) if any(
      v is not None for v in special.values()) else ()
  _json(os.path.join(out, "generation_config.json"),
        hf_chat.generation_config(cfg, special, stops))
