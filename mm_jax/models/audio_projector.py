"""Projector from the audio tower's width to the decoder's width.

linear: one affine map (Qwen2-Audio's `multi_modal_projector`). mlp: Linear-GELU-Linear,
as LLaVA-1.5's mlp2x_gelu for images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.config import AudioConfig
from mm_jax.models.layers import ACTIVATIONS, Dense


class AudioProjector(nnx.Module):
  """float[B, L', D_a] -> float[B, L', D]."""

  def __init__(self, cfg: AudioConfig, d_out: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Dense((cfg.width,), (d_out,), ("audio_embed", "embed"), **kw)
    self.fc2 = Dense((d_out,), (d_out,), ("mlp", "embed"), **kw) if cfg.projector == "mlp" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.fc1(x)
    return x if self.fc2 is None else self.fc2(ACTIVATIONS["gelu"](x))
