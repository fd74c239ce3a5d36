"""Phi family (DecoderConfig.family="phi") against transformers: PhiForCausalLM and a LLaVA
with a Phi text model, full pass and KV cache, greedy generation, config.init and export.

Tiny random float32 models built from configs (nothing is downloaded). Head size 10 with
partial_rotary_factor 0.4: RoPE on 4 dims, 6 passed through, as Phi-2's 32 of 80.
"""

from __future__ import annotations

import dataclasses
import functools

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from hf_models import (
  IMAGE_TOKEN,
  VISION,
  config_like,
  hf_model,
  llava_batch,
  save_hf,
  state_dict,
  torch,
  transformers,
)
from test_hf_parity import abstract, run, run_decoder

from mm_jax import sharding
from mm_jax.config import ConfigError, DecoderConfig, ModelConfig
from mm_jax.infer.generate import Decoding, Generator, left_pad
from mm_jax.interop import hf, hf_export, hf_import
from mm_jax.interop import hf_config as hc
from mm_jax.interop import hf_mapping as hm
from mm_jax.models.decoder import Decoder
from mm_jax.models.multimodal import MultimodalModel

assert_close = functools.partial(hf_models.assert_close, tol=1e-4)
PHI_TEXT = dict(vocab_size=64, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.4,
                rope_theta=500.0, layer_norm_eps=1e-5)
EOS = 2


def phi_hf(tie: bool = False):
  config = transformers.PhiConfig(**PHI_TEXT, tie_word_embeddings=tie)
  return hf_model(transformers.PhiForCausalLM, config)


def llava_phi_config():
  text = transformers.PhiConfig(**PHI_TEXT, eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
  return transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION).to_dict(),
                                  text_config=text.to_dict(), image_token_index=IMAGE_TOKEN,
                                  vision_feature_layer=-2,
                                  vision_feature_select_strategy="default")


def cached_logits(decoder: Decoder, tokens: jax.Array, prefill: int) -> jax.Array:
  """Logits float32[B, T, V] from `step`: a prefill of `prefill` tokens, then one by one."""
  b, t = tokens.shape
  x = decoder.embed(tokens)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cache, outs = decoder.init_cache(b, t), []
  for lo, hi in [(0, prefill)] + [(i, i + 1) for i in range(prefill, t)]:
    out, cache = decoder.step(x[:, lo:hi], pos[:, lo:hi], jnp.ones((b, hi - lo), bool), cache)
    outs.append(out)
  return jnp.concatenate(outs, 1)


@pytest.mark.parametrize("tie", [False, True])
def test_phi_matches_hf_full_pass_and_kv_cache(tie):
  ref = phi_hf(tie)
  cfg = hc.decoder_config_from_hf(ref.config.to_dict())
  assert (cfg.family, cfg.head_size, cfg.rotary_dims, cfg.kv_heads) == ("phi", 10, 4, 2)
  assert cfg.lm_head_bias and cfg.tie_embeddings == tie
  decoder = abstract(Decoder, cfg)
  hm.load_flat_into(decoder, hm.decoder_to_mm(state_dict(ref), cfg))
  names = {hm.path_str(p) for p in hm.flat_params(decoder)}
  assert "layers/0/fc1/bias" in names and "layers/0/mlp_norm/scale" not in names
  assert ("lm_bias" in names) == tie
  tokens = np.random.default_rng(0).integers(0, PHI_TEXT["vocab_size"], (2, 12))
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens)).logits.numpy()
  assert_close(run_decoder(decoder, tokens), want, f"phi logits tie={tie}")
  cached = run(lambda m, t: cached_logits(m, t, 8), decoder, jnp.asarray(tokens, jnp.int32))
  assert_close(cached, want, f"phi cached logits tie={tie}")
  back = hm.mm_to_decoder(hm.flat_params(decoder), cfg)
  sd = state_dict(ref)
  assert back.keys() == {k for k in sd if not (tie and k == "lm_head.weight")}


def test_llava_phi_matches_hf():
  ref = hf_model(transformers.LlavaForConditionalGeneration, llava_phi_config())
  cfg = hc.model_config_from_hf_llava(ref.config.to_dict(), attention="xla", merge="xla")
  assert cfg.decoder.family == "phi" and not cfg.decoder.lm_head_bias  # LLaVA's own head
  model = abstract(MultimodalModel, cfg)
  hm.load_flat_into(model, hm.llava_to_mm(state_dict(ref), cfg))
  tokens, pixels, batch = llava_batch("two_one", cfg.vision.tokens_per_image)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels)).logits
  assert_close(run(lambda m, b: m(b), model, batch), want.numpy(), "llava-phi logits")


def test_llava_phi_greedy_matches_transformers_generate():
  torch.manual_seed(0)
  ref = transformers.LlavaForConditionalGeneration(llava_phi_config()).float().eval()
  # Matrices N(0, 4 / fan_in): at 1 / fan_in a random 2-layer decoder repeats one token.
  # LayerNorm biases N(0, 0.1), not ~1: a final-norm bias of ~1 adds one fixed logit
  # direction that makes a single token win at every step.
  with torch.no_grad():
    for name, p in ref.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 and "norm" in name
              and name.endswith(".weight")
              else torch.randn_like(p) * (0.1 if p.ndim == 1 else 2 * p[0].numel() ** -0.5))
  cfg = hc.model_config_from_hf_llava(ref.config.to_dict(), attention="xla", merge="xla")
  ours = abstract(MultimodalModel, cfg)
  hm.load_flat_into(ours, hm.llava_to_mm(state_dict(ref), cfg))
  per, rng = cfg.vision.tokens_per_image, np.random.default_rng(5)
  text = lambda n: list(rng.integers(3, IMAGE_TOKEN, n))
  one = [1] + text(3) + [IMAGE_TOKEN] * per + text(4)
  two = [1] + text(2) + [IMAGE_TOKEN] * per + text(2) + [IMAGE_TOKEN] * per + text(5)
  pixels = rng.normal(size=(3, 3, VISION["image_size"], VISION["image_size"])).astype(np.float32)
  n_new, want = 12, []
  for ids, px in ((one, pixels[:1]), (two, pixels[1:])):
    with torch.no_grad():
      seq = ref.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px),
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n_new, do_sample=False, eos_token_id=EOS,
                         pad_token_id=0)
    want.append(seq[0, len(ids):].tolist())
  batch = {**left_pad([np.asarray(p, np.int32) for p in (one, two)], pad_id=0),
           "images": pixels[[0, 0, 1, 2]].transpose(0, 2, 3, 1),
           "image_valid": np.array([True, False, True, True])}
  with jax.default_matmul_precision("highest"):
    got = Generator(ours, Decoding(max_new_tokens=n_new, stop_ids=(EOS,)))(batch)
  assert got == [w[:len(g)] for w, g in zip(want, got, strict=True)] and \
      [len(g) for g in got] == [len(w) for w in want], (got, want)
  assert all(len(set(w)) > 3 for w in want), ("degenerate reference", want)


def test_llava_phi_folder_imports_and_exports_to_the_same_logits(tmp_path):
  ref = hf_model(transformers.LlavaForConditionalGeneration, llava_phi_config())
  folder = save_hf(ref, tmp_path / "hf")
  cfg = config_like(hc.model_config_from_hf_llava(ref.config.to_dict()),
                    **{"init.llava_from_hf": folder})
  model = hf.load_model(cfg, sharding.make_mesh(cfg.mesh))
  out = str(tmp_path / "out")
  hf_export.export_model(model, cfg, out)
  exported = hf_models.strict_load(transformers.LlavaForConditionalGeneration, out)
  text = exported.config.text_config
  assert text.model_type == "phi" and text.rope_parameters["partial_rotary_factor"] == 0.4
  tokens, pixels, _ = llava_batch("two_one", cfg.model.vision.tokens_per_image)
  with torch.no_grad():
    logits = [m(input_ids=torch.from_numpy(tokens),
                pixel_values=torch.from_numpy(pixels)).logits.numpy() for m in (exported, ref)]
  hf_models.assert_close(*logits, "exported llava-phi logits", 1e-5)


def test_phi_folder_streams_into_the_decoder_and_mismatches_name_the_key(tmp_path):
  ref = phi_hf()
  folder = save_hf(ref, tmp_path / "phi")
  decoder = hc.decoder_config_from_hf(hf_import.read_config(folder))
  tiny = tiny_config().model  # a small random tower and projector around the Phi decoder
  cfg = config_like(dataclasses.replace(tiny, decoder=decoder), **{"init.decoder_from_hf": folder})
  (src,) = hf_import.sources(cfg.init, cfg.model)
  got = {path: x for path, _, x in hf_import.tensors(src)}  # what init_from_hf places
  want = hm.decoder_to_mm(state_dict(ref), decoder, ("decoder",))
  params = nnx.to_flat_state(nnx.state(abstract(Decoder, decoder), nnx.Param))
  assert got.keys() == want.keys() == {("decoder", *p) for p, _ in params}
  for path, x in want.items():
    np.testing.assert_array_equal(got[path], x, err_msg=hm.path_str(path))
  for key, value, message in (
      ("model.decoder.rotary_fraction", 0.8, r"rotary_fraction: 0.8 in the preset, 0.4 in .* "
       r"\(rope_parameters.partial_rotary_factor\)"),
      ("model.decoder.norm_eps", 1e-6, r"norm_eps: .*\(layer_norm_eps\)")):
    bad = config_like(dataclasses.replace(tiny, decoder=decoder),
                      **{"init.decoder_from_hf": folder, key: value})
    with pytest.raises(ConfigError, match=message):
      hf_import.sources(bad.init, bad.model)
  llama = config_like(dataclasses.replace(tiny, decoder=DecoderConfig(
      vocab_size=64, width=40, depth=2, heads=4, kv_heads=2, mlp_dim=64)),
      **{"init.decoder_from_hf": folder})
  with pytest.raises(ConfigError, match=r"decoder.family: 'llama' in the preset, 'phi'"):
    hf_import.sources(llama.init, llama.model)


# ----------------------------------------------------------------------------- configs


def test_phi_config_reads_both_layouts_and_refuses_what_it_cannot_express():
  base = transformers.PhiConfig(**PHI_TEXT).to_dict()  # 5.x: inside rope_parameters
  assert hc.decoder_config_from_hf(base).rotary_fraction == 0.4
  old = {k: v for k, v in base.items() if k != "rope_parameters"} | {
      "rope_theta": 500.0, "partial_rotary_factor": 0.4}  # 4.x: top level
  assert hc.decoder_config_from_hf(old) == hc.decoder_config_from_hf(base)
  for bad, message in (
      ({k: v for k, v in old.items() if k != "partial_rotary_factor"},
       "text_config.partial_rotary_factor: missing"),
      (base | {"partial_rotary_factor": 0.5}, "partial_rotary_factor: conflicts"),
      (base | {"qk_layernorm": True}, "text_config.qk_layernorm"),
      (base | {"hidden_act": "relu"}, "text_config.hidden_act"),
      ({k: v for k, v in base.items() if k != "layer_norm_eps"}, "text_config.layer_norm_eps"),
      (transformers.LlamaConfig(vocab_size=64).to_dict() | {"partial_rotary_factor": 0.5},
       "text_config.partial_rotary_factor: 0.5: partial rotary is implemented for .*phi")):
    with pytest.raises(ConfigError, match=message):
      hc.decoder_config_from_hf(bad)
  # config.json files: PhiConfig's class defaults, but no partial_rotary_factor (0.5 there).
  ref = transformers.PhiConfig().to_dict()
  for key, value in hf_import.complete({}, "phi").items():
    want = ref["rope_parameters"][key] if key == "rope_theta" else ref[key]
    assert value == want, key
  with pytest.raises(ConfigError, match="partial_rotary_factor"):
    hc.decoder_config_from_hf(hf_import.complete({}, "phi"))


@pytest.mark.parametrize("overrides,message", [
    ({"family": "phi"}, "config.model.decoder.norm: family=phi needs norm='layer'"),
    ({"family": "gpt2"}, "config.model.decoder.family"),
    ({"norm": "layer"}, "config.model.decoder.norm: family=llama needs norm='rms'"),
    ({"rotary_fraction": 0.5}, "config.model.decoder.rotary_fraction: family=llama"),
    ({"rotary_fraction": 0.3}, r"config.model.decoder.rotary_fraction: 0.3 x head size 32 "
     "gives 9"),
    ({"mlp": "relu"}, "config.model.decoder.mlp"),
])
def test_decoder_family_combinations_name_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message):
    tiny_config(**{f"model.decoder.{k}": v for k, v in overrides.items()})


def test_export_refuses_a_lm_head_bias():
  phi = hc.decoder_config_from_hf(transformers.PhiConfig(**PHI_TEXT).to_dict())
  with pytest.raises(ConfigError, match="config.model.decoder.lm_head_bias"):
    hf_export.check_exportable(ModelConfig(decoder=phi))
  hf_export.check_exportable(ModelConfig(decoder=dataclasses.replace(phi, lm_head_bias=False)))


def test_export_refuses_video_and_audio_models():
  with pytest.raises(ConfigError, match="config.model.modalities"):
    hf_export.check_exportable(ModelConfig(modalities=("image", "audio")))
