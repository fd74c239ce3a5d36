"""Hugging Face Whisper encoder <-> mm_jax AudioTower: config and parameters, pure numpy.

Uses `hf_mapping`'s Rule machinery. Shape letters: D width, M mel bins, N heads, H head
size, F mlp width. Whisper's Conv1d weights [D_out, C_in, 3] become our conv kernels
[3, C_in, D_out]; Linear weights [out, in] become Dense kernels [*in, *out].

Keys: a `WhisperEncoder` state dict (`conv1.weight`, ...), a `WhisperModel` one
(`encoder.*`) or a `WhisperForConditionalGeneration` one (`model.encoder.*`); the decoder's
tensors are left out. `embed_positions.weight` is no parameter here (the tower computes the
sinusoids): on import it must equal that table within `POSITIONS_ATOL`, since a checkpoint
with trained positions would silently change the numerics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mm_jax.config import AudioConfig
from mm_jax.interop import hf_config as hc
from mm_jax.interop import hf_mapping as hm
from mm_jax.models.audio import sinusoids

POSITIONS_ATOL = 1e-3  # float32 rounding of the table is ~4e-5 (mm_jax.models.audio)
_PREFIXES = ("model.encoder.", "encoder.")  # WhisperForConditionalGeneration, WhisperModel


def audio_config_from_hf(hf_config: Mapping[str, Any], where: str = "config",
                         **overrides: Any) -> AudioConfig:
  """WhisperConfig dict -> AudioConfig of its encoder; `overrides` replace fields.

  pool defaults to 1 (plain Whisper: no pooling); pass pool=2 for Qwen2-Audio-style rows.
  """
  c = hf_config
  model_type = hc.req(c, "model_type", where)
  hc.expect(model_type == "whisper", f"{where}.model_type", f"{model_type!r} is not whisper")
  act = c.get("activation_function", "gelu")
  hc.expect(act == "gelu", f"{where}.activation_function", f"{act!r}: only gelu is supported")
  fields = dict(kind="whisper", n_mels=hc.req(c, "num_mel_bins", where),
                width=hc.req(c, "d_model", where), depth=hc.req(c, "encoder_layers", where),
                heads=hc.req(c, "encoder_attention_heads", where),
                mlp_dim=hc.req(c, "encoder_ffn_dim", where),
                max_source_positions=hc.req(c, "max_source_positions", where),
                layer_norm_eps=1e-5, pool=1)  # Whisper's nn.LayerNorm default eps
  cfg = AudioConfig(**{**fields, **overrides})
  cfg.validate(where)
  return cfg


@dataclasses.dataclass(frozen=True)
class Conv1dRule(hm.Rule):
  """A Conv1d weight [D_out, C_in, k] <-> our conv kernel [k, C_in, D_out]."""

  def to_mm(self, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 1, 0))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).transpose(2, 1, 0))


def _conv(hf: str, path: hm.Path, c_in: int, d: int) -> list[hm.Rule]:
  return [Conv1dRule(f"{hf}.weight", (*path, "kernel"), "conv1d", (d, c_in, 3), (3, c_in, d)),
          hm.Rule(f"{hf}.bias", (*path, "bias"), "copy", (d,), (d,))]


def audio_rules(cfg: AudioConfig) -> list[hm.Rule]:
  """WhisperEncoder keys (no prefix, no `embed_positions`) <-> AudioTower parameters."""
  d, nh = cfg.width, (cfg.heads, cfg.width // cfg.heads)
  rules = _conv("conv1", ("conv1",), cfg.n_mels, d) + _conv("conv2", ("conv2",), d, d)
  for i in range(cfg.depth):
    hf, at = f"layers.{i}", ("blocks", i)
    rules += [*hm._norm(f"{hf}.self_attn_layer_norm", (*at, "ln1"), d, bias=True),
              *hm._norm(f"{hf}.final_layer_norm", (*at, "ln2"), d, bias=True),
              *hm._linear(f"{hf}.self_attn.q_proj", (*at, "q"), (d,), nh, bias=True),
              *hm._linear(f"{hf}.self_attn.k_proj", (*at, "k"), (d,), nh, bias=False),
              *hm._linear(f"{hf}.self_attn.v_proj", (*at, "v"), (d,), nh, bias=True),
              *hm._linear(f"{hf}.self_attn.out_proj", (*at, "o"), nh, (d,), bias=True),
              *hm._linear(f"{hf}.fc1", (*at, "fc1"), (d,), (cfg.mlp_dim,), bias=True),
              *hm._linear(f"{hf}.fc2", (*at, "fc2"), (cfg.mlp_dim,), (d,), bias=True)]
  return rules + hm._norm("layer_norm", ("final_ln",), d, bias=True)


def encoder_prefix(keys: Iterable[str]) -> str:
  """The key prefix of the encoder's tensors: `model.encoder.`, `encoder.` or "" (bare)."""
  keys = list(keys)
  return next((p for p in _PREFIXES if any(k.startswith(p) for k in keys)), "")


def encoder_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
  """The encoder's tensors under WhisperEncoder keys (prefix stripped, decoder dropped)."""
  prefix = encoder_prefix(sd)
  return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


def check_positions(table: Any, cfg: AudioConfig) -> None:
  """ValueError unless `table` (HF `embed_positions.weight`) is the tower's sinusoids."""
  table = np.asarray(table, np.float32)
  ours = sinusoids(cfg.max_source_positions, cfg.width)
  if table.shape != ours.shape:
    raise ValueError(f"embed_positions.weight: shape {table.shape}, expected {ours.shape}")
  err = float(np.abs(table - ours).max())
  if err > POSITIONS_ATOL:
    raise ValueError(f"embed_positions.weight differs from Whisper's sinusoids by {err:.2e} "
                     f"(> {POSITIONS_ATOL}); trained positions are not supported")


def audio_to_mm(sd: Mapping[str, Any], cfg: AudioConfig, prefix: hm.Path = ()) -> hm.Flat:
  """Whisper state dict (encoder, model or conditional generation) -> AudioTower params."""
  sd = encoder_state_dict(sd)
  if "embed_positions.weight" not in sd:
    raise ValueError("embed_positions.weight: missing from the Whisper state dict")
  check_positions(sd.pop("embed_positions.weight"), cfg)
  return hm.hf_to_mm(sd, audio_rules(cfg), prefix)


def mm_to_audio(flat: Mapping[hm.Path, Any], cfg: AudioConfig, prefix: hm.Path = ()) -> dict:
  """AudioTower params -> a WhisperEncoder state dict (with the sinusoidal table).

  Whisper has no pooling: with cfg.pool > 1 the export holds the weights, not the rows.
  """
  sd = hm.mm_to_hf(flat, audio_rules(cfg), prefix)
  sd["embed_positions.weight"] = np.array(sinusoids(cfg.max_source_positions, cfg.width))
  return sd
