"""Parity with transformers' Whisper encoder, loaded through `mm_jax.interop.audio_mapping`
from a tiny random float32 WhisperModel (no download). Tolerance as test_hf_parity.py:
max|ours - ref| <= 1e-4 * max|ref|, at "highest" matmul precision.
"""

from __future__ import annotations

import math

import hf_models
import jax
import numpy as np
import pytest
from flax import nnx

from mm_jax.config import ConfigError
from mm_jax.interop import audio_mapping as am
from mm_jax.interop import hf_mapping as hm
from mm_jax.models.audio import AudioTower, sinusoids

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
# max_source_positions 50: HF's encoder takes exactly 2 * 50 = 100 log-mel frames.
WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
               decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=64,
               max_source_positions=50, max_target_positions=16, num_mel_bins=80,
               pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=3)


@pytest.fixture(scope="module")
def whisper():
  """WhisperModel with random weights but Whisper's fixed sinusoidal position table."""
  model = hf_models.hf_model(transformers.WhisperModel, transformers.WhisperConfig(**WHISPER))
  table = model.encoder.embed_positions.weight
  with torch.no_grad():  # randomize() drew this table too; restore transformers' sinusoids
    table.copy_(transformers.models.whisper.modeling_whisper.sinusoids(*table.shape))
  return model


def load_tower(sd, cfg):
  tower = nnx.eval_shape(lambda: AudioTower(cfg, attention_impl="xla", rngs=nnx.Rngs(0)))
  hm.load_flat_into(tower, am.audio_to_mm(sd, cfg))
  return tower


def test_audio_tower_matches_whisper_encoder(whisper):
  cfg = am.audio_config_from_hf(whisper.config.to_dict())
  assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.pool) == (32, 2, 4, 64, 1)
  tower = load_tower(hf_models.state_dict(whisper), cfg)  # `encoder.*` keys, decoder dropped
  mel = np.random.default_rng(0).normal(size=(2, 80, 100)).astype(np.float32)  # [B, M, L]
  with torch.no_grad():
    ref = whisper.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
  with jax.default_matmul_precision("highest"):
    ours, valid = nnx.jit(lambda m, x, v: m(x, v))(tower, mel.transpose(0, 2, 1),
                                                   np.ones((2, 100), bool))
  assert valid.shape == (2, 50) and bool(valid.all())
  hf_models.assert_close(ours, ref, "whisper encoder", tol=TOL)


def test_audio_mapping_key_layouts_and_round_trip(whisper):
  cfg = am.audio_config_from_hf(whisper.config.to_dict())
  sd = hf_models.state_dict(whisper)
  flat = am.audio_to_mm(sd, cfg)
  generation = {f"model.{k}": v for k, v in sd.items()}  # WhisperForConditionalGeneration
  flat_gen = am.audio_to_mm(generation, cfg)
  assert flat.keys() == flat_gen.keys()
  assert all(np.array_equal(flat[k], flat_gen[k]) for k in flat)
  assert flat[("conv1", "kernel")].shape == (3, 80, 32)  # [k, M, D] from HF's [D, M, k]
  np.testing.assert_array_equal(flat[("conv1", "kernel")],
                                sd["encoder.conv1.weight"].transpose(2, 1, 0))
  back = am.mm_to_audio(flat, cfg)
  encoder = whisper.encoder.state_dict()
  assert back.keys() == encoder.keys()
  for key, value in encoder.items():
    np.testing.assert_allclose(back[key], value.numpy(), atol=4e-5, err_msg=key)


def test_audio_mapping_rejects_trained_positions(whisper):
  cfg = am.audio_config_from_hf(whisper.config.to_dict())
  sd = am.encoder_state_dict(hf_models.state_dict(whisper))
  sd["embed_positions.weight"] = sd["embed_positions.weight"] + 0.01
  with pytest.raises(ValueError, match="embed_positions.weight differs"):
    am.audio_to_mm(sd, cfg)


def test_sinusoids_match_transformers_at_full_size():
  """transformers' `sinusoids` formula in float32 torch, with its float32 exp correctly
  rounded: torch's own float32 exp is not (1 ulp apart on AVX-512 CPUs), and at angles of
  ~1500 rad one ulp of the timescale moves sin by ~1e-4, so its raw output differs by CPU.
  Real checkpoints carry the table (`embed_positions.weight`), which the importer copies."""
  import torch

  inc = math.log(10000) / (1280 // 2 - 1)
  inv = torch.exp((-inc * torch.arange(640)).double()).float()  # the exp, correctly rounded
  angles = torch.arange(1500).view(-1, 1) * inv.view(1, -1)
  ref = torch.cat([angles.sin(), angles.cos()], dim=1).numpy()
  np.testing.assert_allclose(sinusoids(1500, 1280), ref, rtol=0, atol=4e-5)


def test_audio_config_reader_names_missing_and_unsupported_keys():
  c = transformers.WhisperConfig(**WHISPER).to_dict()
  del c["encoder_ffn_dim"]
  with pytest.raises(ConfigError, match=r"^audio_config\.encoder_ffn_dim: missing"):
    am.audio_config_from_hf(c, where="audio_config")
  c = transformers.WhisperConfig(**WHISPER, activation_function="relu").to_dict()
  with pytest.raises(ConfigError, match=r"^config\.activation_function"):
    am.audio_config_from_hf(c)
  assert am.audio_config_from_hf(transformers.WhisperConfig(**WHISPER).to_dict(),
                                 pool=2).pool == 2
