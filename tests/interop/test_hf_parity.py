"""Parity with transformers: CLIP/SigLIP towers, LLaMA decoder and LLaVA, loaded through
`mm_jax.interop.hf_mapping` from tiny random float32 models built from configs (no weights
are downloaded). Tolerance: max|ours - ref| <= 1e-4 * max|ref|, fixed; our side runs at
"highest" matmul precision so the same bound holds on GPU (no TF32).
"""

from __future__ import annotations

import dataclasses
import functools

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import (
  IMAGE,
  IMAGE_TOKEN,
  PATCH,
  TEXT,
  VISION,
  hf_model,
  images_np,
  llava_batch,
  llava_hf,
  nhwc,
  state_dict,
)

from mm_jax.config import ConfigError, DecoderConfig, ProjectorConfig, VisionConfig
from mm_jax.interop import hf_config as hc
from mm_jax.interop import hf_mapping as hm
from mm_jax.models.decoder import Decoder
from mm_jax.models.multimodal import MultimodalModel
from mm_jax.models.projector import Projector
from mm_jax.models.vit import VisionTower

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
assert_close = functools.partial(hf_models.assert_close, tol=TOL)


def run(fn, model, *args):
  """fn(model, *args) under nnx.jit at full float32 matmul precision (faster than eager)."""
  with jax.default_matmul_precision("highest"):
    return jax.device_get(nnx.jit(fn)(model, *args))


def abstract(cls, cfg):
  """An mm_jax model without random init (load_flat_into fills every parameter)."""
  if cls is MultimodalModel:
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  return nnx.eval_shape(lambda: cls(cfg, attention_impl="xla", rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------- vision


def vision_hf(kind: str):
  if kind == "clip":
    return hf_model(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**VISION))
  return hf_model(transformers.SiglipVisionModel, transformers.SiglipVisionConfig(**VISION))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vision_tower_matches_hf(kind):
  ref = vision_hf(kind)
  cfg = hc.vision_config_from_hf(ref.config.to_dict())
  assert cfg.kind == kind
  flat = hm.vision_to_mm(state_dict(ref), cfg)
  tower = abstract(VisionTower, cfg)
  hm.load_flat_into(tower, flat)
  pixels = images_np(3)
  with torch.no_grad():
    out = ref(torch.from_numpy(pixels), output_hidden_states=True)
  ours, last = run(lambda m, x: (m.hidden_states(x), m.last_hidden_state(x)), tower,
                   nhwc(pixels))
  assert_close(last, out.last_hidden_state.numpy(), f"{kind} last_hidden_state")
  assert len(ours) == len(out.hidden_states) == cfg.depth + 1
  for i, (a, b) in enumerate(zip(ours, out.hidden_states, strict=True)):
    assert_close(a, b.numpy(), f"{kind} hidden_states[{i}]")
  if kind == "clip":  # HF CLIP applies post_layernorm to the class token only
    pooled = run(lambda m, x: m.pooled(x), tower, nhwc(pixels))
    assert_close(pooled, out.pooler_output.numpy(), "clip pooler_output")

  selects = [("patch", -2), ("patch", 0)] + ([("cls_patch", -1)] if kind == "clip" else [])
  for select, layer in selects:
    tower = abstract(VisionTower, dataclasses.replace(cfg, feature_select=select,
                                                     feature_layer=layer))
    hm.load_flat_into(tower, flat)
    want = out.hidden_states[layer].numpy()
    want = want[:, 1:] if kind == "clip" and select == "patch" else want
    assert_close(run(lambda m, x: m(x), tower, nhwc(pixels)), want,
                 f"{kind} features {select} layer {layer}")


# ----------------------------------------------------------------------------- llama


def run_decoder(decoder: Decoder, tokens: np.ndarray, positions=None, segments=None):
  tokens = jnp.asarray(tokens, jnp.int32)
  positions = (jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
               if positions is None else jnp.asarray(positions, jnp.int32))
  segments = jnp.ones_like(tokens) if segments is None else jnp.asarray(segments, jnp.int32)
  return run(lambda m, t, p, s: m(m.embed(t), p, s), decoder, tokens, positions, segments)


@pytest.mark.parametrize("tie,head_dim,bias", [(False, None, False), (True, None, False),
                                               (False, 16, False), (False, None, True)])
def test_llama_matches_hf(tie, head_dim, bias):
  config = transformers.LlamaConfig(**TEXT, tie_word_embeddings=tie, head_dim=head_dim,
                                    attention_bias=bias, mlp_bias=bias)
  ref = hf_model(transformers.LlamaForCausalLM, config)
  cfg = hc.decoder_config_from_hf(ref.config.to_dict())
  assert (cfg.tie_embeddings, cfg.rope_theta, cfg.kv_heads) == (tie, 500.0, 2)
  assert cfg.attention_bias == cfg.mlp_bias == bias
  assert cfg.head_size == (head_dim or 8)
  decoder = abstract(Decoder, cfg)
  hm.load_flat_into(decoder, hm.decoder_to_mm(state_dict(ref), cfg))
  tokens = np.random.default_rng(0).integers(0, TEXT["vocab_size"], (2, 12))
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens)).logits.numpy()
  assert_close(run_decoder(decoder, tokens), want, f"llama logits tie={tie}")


def test_packed_segments_match_separate_sequences():
  """Two samples packed in one row (positions restart) == each sample on its own."""
  cfg = DecoderConfig(vocab_size=64, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=64,
                      rope_theta=500.0)
  decoder = abstract(Decoder, cfg)
  rng = np.random.default_rng(0)
  params = nnx.to_flat_state(nnx.state(decoder, nnx.Param))
  # Matrices N(0, 1/fan_in) (fan_in: the kernel's first dim here), norm scales 1 + N(0, 0.1).
  hm.load_flat_into(decoder, {p: rng.normal(size=v.shape) * v.shape[0] ** -0.5 if v.ndim > 1
                              else 1 + 0.1 * rng.normal(size=v.shape) for p, v in params})
  a, b = rng.integers(0, 64, (1, 5)), rng.integers(0, 64, (1, 7))
  packed = run_decoder(decoder, np.concatenate([a, b], 1),
                       positions=np.concatenate([np.arange(5), np.arange(7)])[None],
                       segments=np.array([[1] * 5 + [2] * 7]))
  assert_close(packed[:, :5], run_decoder(decoder, a), "packed segment 1")
  assert_close(packed[:, 5:], run_decoder(decoder, b), "packed segment 2")


# ----------------------------------------------------------------------------- llava

@pytest.mark.parametrize("vision,strategy,layout,tie", [
    ("clip", "default", "two_one", False),
    ("clip", "default", "two_none", True),
    ("clip", "full", "two_one", False),
    ("siglip", "full", "two_one", False),
])
def test_llava_matches_hf(vision, strategy, layout, tie):
  ref = llava_hf(vision, strategy, tie)
  cfg = hc.model_config_from_hf_llava(ref.config.to_dict(), attention="xla", merge="xla")
  assert cfg.image_token_id == IMAGE_TOKEN and cfg.decoder.tie_embeddings == tie
  assert cfg.vision.feature_select == ("cls_patch" if (vision, strategy) == ("clip", "full")
                                       else "patch")
  model = abstract(MultimodalModel, cfg)
  hm.load_flat_into(model, hm.llava_to_mm(state_dict(ref), cfg))
  tokens, pixels, batch = llava_batch(layout, cfg.vision.tokens_per_image)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels)).logits
  ours = run(lambda m, b: m(b), model, batch)
  assert_close(ours, want.numpy(), f"llava logits {vision}/{strategy}/{layout}")


# ----------------------------------------------------------------------------- mapping


def old_layout(sd: dict) -> dict:
  """transformers 5.x LLaVA keys -> the published llava-hf (4.x) layout."""
  renames = (("model.vision_tower.", "vision_tower.vision_model."),
             ("model.multi_modal_projector.", "multi_modal_projector."),
             ("model.language_model.", "language_model.model."),
             ("lm_head.", "language_model.lm_head."))
  out = {}
  for k, v in sd.items():
    new, old = next((r for r in renames if k.startswith(r[0])), ("", ""))
    out[old + k.removeprefix(new)] = v
  return out


@pytest.mark.parametrize("vision,tie", [("clip", False), ("siglip", True)])
def test_llava_layouts_and_export_roundtrip(vision, tie):
  ref = llava_hf(vision, "full", tie)
  cfg = hc.model_config_from_hf_llava(ref.config.to_dict())
  sd = state_dict(ref)
  flat = hm.llava_to_mm(sd, cfg)
  flat_old = hm.llava_to_mm(old_layout(sd), cfg)
  assert flat.keys() == flat_old.keys()
  for path in flat:
    np.testing.assert_array_equal(flat[path], flat_old[path], err_msg=hm.path_str(path))
  model = abstract(MultimodalModel, cfg)
  want = {hm.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert {hm.path_str(p) for p in flat} == want
  hm.load_flat_into(model, flat)
  back = hm.mm_to_llava(hm.flat_params(model), cfg)
  kept = {k for k in sd if not k.startswith("model.vision_tower.head.")
          and not (tie and k == "lm_head.weight")}
  assert back.keys() == kept
  for k in kept:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_load_flat_into_rejects_mismatches():
  cfg = VisionConfig(image_size=IMAGE, patch_size=PATCH, width=32, depth=1, heads=4, mlp_dim=64)
  tower = abstract(VisionTower, cfg)
  flat = {p: np.zeros(v.shape, v.dtype)
          for p, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))}
  bad = dict(flat)
  bad[("blocks", 0, "q", "kernel")] = np.zeros((32, 32), np.float32)
  with pytest.raises(ValueError, match="blocks/0/q/kernel: shape"):
    hm.load_flat_into(tower, bad)
  with pytest.raises(ValueError, match="pos"):
    hm.load_flat_into(tower, {p: v for p, v in flat.items() if p != ("pos",)})
  with pytest.raises(ValueError, match="extra"):
    hm.load_flat_into(tower, {**flat, ("extra",): np.zeros(1)})
  sd = hm.mm_to_vision(flat, cfg)
  with pytest.raises(ValueError, match="encoder.layers.0.mlp.fc1.weight"):
    hm.vision_to_mm({k: v for k, v in sd.items() if "fc1.weight" not in k}, cfg)


def test_config_rope_theta_both_places_or_error():
  base = transformers.LlamaConfig(**TEXT).to_dict()
  assert hc.decoder_config_from_hf(base).rope_theta == 500.0  # 5.x: rope_parameters
  old = {k: v for k, v in base.items() if k != "rope_parameters"} | {"rope_theta": 250.0}
  assert hc.decoder_config_from_hf(old).rope_theta == 250.0  # 4.x: top level
  neither = {k: v for k, v in old.items() if k != "rope_theta"}
  with pytest.raises(ConfigError, match="text_config.rope_theta"):
    hc.decoder_config_from_hf(neither)
  with pytest.raises(ConfigError, match="conflicts"):
    hc.decoder_config_from_hf(base | {"rope_theta": 1.0})
  scaled = base | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}
  with pytest.raises(ConfigError, match="rope_type"):
    hc.decoder_config_from_hf(scaled)


def test_llava_config_rejects_what_we_cannot_express():
  vision = transformers.SiglipVisionConfig(**VISION).to_dict()
  llava = transformers.LlavaConfig(vision_config=vision, text_config=TEXT,
                                   image_token_index=IMAGE_TOKEN).to_dict()
  with pytest.raises(ConfigError, match="vision_feature_select_strategy"):
    hc.model_config_from_hf_llava(llava)  # "default" would drop SigLIP's first patch
  with pytest.raises(ConfigError, match="vision_feature_layer"):
    hc.model_config_from_hf_llava(llava | {"vision_feature_select_strategy": "full",
                                           "vision_feature_layer": [-2, -1]})
  with pytest.raises(ConfigError, match="text_config.rms_norm_eps"):
    text = {k: v for k, v in llava["text_config"].items() if k != "rms_norm_eps"}
    hc.model_config_from_hf_llava(llava | {"vision_feature_select_strategy": "full",
                                           "text_config": text})


def test_load_flat_into_concrete_model_casts_and_keeps_placement():
  proj = Projector(ProjectorConfig(), 8, 16, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  flat = {p: np.full(v.shape, 0.5, np.float64)
          for p, v in nnx.to_flat_state(nnx.state(proj, nnx.Param))}
  hm.load_flat_into(proj, flat)
  assert proj.fc1.kernel.get_value().dtype == jnp.bfloat16
  assert isinstance(proj.fc2.bias.get_value(), jax.Array)
  np.testing.assert_array_equal(hm.flat_params(proj)[("fc2", "kernel")], np.full((16, 16), 0.5))
