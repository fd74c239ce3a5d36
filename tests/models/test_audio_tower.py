"""AudioTower frame masking and pooling, AudioProjector, AudioConfig (random weights, CPU)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mm_jax import sharding
from mm_jax.config import AudioConfig, ConfigError
from mm_jax.interop import hf_mapping as hm
from mm_jax.models.audio import AudioTower, tokens_for_frames
from mm_jax.models.audio_projector import AudioProjector

CFG = AudioConfig(width=32, depth=2, heads=4, mlp_dim=64, max_source_positions=50, pool=1)


def random_tower(cfg: AudioConfig, seed: int = 0) -> AudioTower:
  """A tower with every parameter random (biases and LayerNorms too, so masking bugs cannot
  hide behind zero biases); set from numpy, which skips paying to compile the random init."""
  tower = nnx.eval_shape(lambda: AudioTower(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, var in nnx.to_flat_state(nnx.state(tower, nnx.Param)):
    fan_in = int(np.prod(var.shape[:-1])) if var.ndim > 1 else 1
    scale = fan_in ** -0.5 if var.ndim > 1 else 0.1
    flat[path] = rng.normal(size=var.shape) * scale + (path[-1] == "scale")
  hm.load_flat_into(tower, flat)
  return tower


_forward = nnx.jit(lambda m, x, v: m(x, v))  # one wrapper: its cache persists across tests


def run(tower, mel, valid):
  return jax.device_get(_forward(tower, mel, valid))


@pytest.mark.parametrize("n, pool", [(60, 1), (61, 2)])
def test_padded_clip_matches_clip_alone(n, pool):
  tower = random_tower(dataclasses.replace(CFG, pool=pool))
  rng = np.random.default_rng(0)
  clip = rng.normal(size=(n, 80)).astype(np.float32)
  garbage = rng.normal(size=(100 - n, 80)).astype(np.float32) * 5  # padding never leaks
  padded = np.concatenate([clip, garbage])[None]
  valid = (np.arange(100) < n)[None]
  out_pad, valid_pad = run(tower, padded, valid)
  out_alone, valid_alone = run(tower, clip[None], np.ones((1, n), bool))
  k = tokens_for_frames(n, tower.cfg)
  assert k == (n + 1) // 2 // pool
  assert out_pad.shape == (1, 50 // pool, 32) and out_alone.shape == (1, k, 32)
  assert valid_pad.sum() == k and bool(valid_pad[0, :k].all()) and bool(valid_alone.all())
  np.testing.assert_allclose(out_pad[0, :k], out_alone[0], rtol=0, atol=1e-5)
  assert not out_pad[0, k:].any()  # invalid rows are zero


def test_pool_averages_pairs_before_final_layer_norm():
  tower1 = random_tower(CFG)
  tower2 = nnx.eval_shape(lambda: AudioTower(dataclasses.replace(CFG, pool=2),
                                             rngs=nnx.Rngs(0)))
  hm.load_flat_into(tower2, hm.flat_params(tower1))
  # B = 1, L = 100: the shape test_padded_clip_matches_clip_alone compiled already.
  mel = np.random.default_rng(1).normal(size=(1, 100, 80)).astype(np.float32)
  valid = np.ones((1, 100), bool)
  states, _ = jax.device_get(nnx.jit(lambda m, x, v: m.encode(x, v))(tower1, mel, valid))
  pairs = states.reshape(1, 25, 2, 32).mean(axis=2)
  expected = jax.device_get(tower1.final_ln(pairs))
  out, out_valid = run(tower2, mel, valid)
  assert out.shape == (1, 25, 32) and bool(out_valid.all())
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_tokens_for_frames():
  pool2 = AudioConfig()
  assert [tokens_for_frames(n, pool2) for n in (3000, 100, 61, 4, 3, 2, 1, 0)] == [
      750, 25, 15, 1, 1, 0, 0, 0]
  assert tokens_for_frames(3000, CFG) == 1500 and tokens_for_frames(61, CFG) == 31


def test_rejects_more_frames_than_positions():
  tower = nnx.eval_shape(lambda: AudioTower(CFG, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="2 \\* max_source_positions"):
    jax.eval_shape(lambda x, v: tower(x, v), jnp.zeros((1, 102, 80)), jnp.ones((1, 102), bool))


def test_parameters_carry_known_logical_axes():
  tower = nnx.eval_shape(lambda: AudioTower(CFG, rngs=nnx.Rngs(0)))
  names = dict(sharding.RULES)
  for path, var in nnx.to_flat_state(nnx.state(tower, nnx.Param)):
    axes = var.get_metadata()["logical_axes"]
    assert len(axes) == var.ndim and all(a is None or a in names for a in axes), path
  assert tower.blocks[0].k.bias is None  # Whisper's key projection has no bias


@pytest.mark.parametrize("kind, n_params", [("linear", 2), ("mlp", 4)])
def test_audio_projector(kind, n_params):
  cfg = dataclasses.replace(CFG, projector=kind)
  proj = nnx.eval_shape(lambda: AudioProjector(cfg, 48, rngs=nnx.Rngs(0)))
  assert len(nnx.to_flat_state(nnx.state(proj, nnx.Param))) == n_params
  assert proj.fc1.kernel.get_metadata()["logical_axes"] == ("audio_embed", "embed")
  out = nnx.eval_shape(lambda: AudioProjector(cfg, 48, rngs=nnx.Rngs(0))(jnp.ones((2, 5, 32))))
  assert out.shape == (2, 5, 48)


@pytest.mark.parametrize("field, value", [("kind", "wav2vec"), ("heads", 5), ("pool", 0),
                                          ("projector", "mlp2x_gelu"), ("width", 2)])
def test_audio_config_validate_names_the_key(field, value):
  cfg = dataclasses.replace(CFG, **{field: value}, **({"heads": 1} if field == "width" else {}))
  with pytest.raises(ConfigError, match=rf"^model\.audio\.(width|{field}):"):
    cfg.validate("model.audio")
