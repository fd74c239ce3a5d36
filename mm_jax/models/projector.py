"""Projectors from a tower's width to the decoder's width.

linear: one affine map (LLaVA-1). mlp2x_gelu: Linear-GELU-Linear (LLaVA-1.5).
residual_mlp: an input Linear followed by `depth` residual blocks x + W2 gelu(W1 x)
(pre-norm-free, as in the small-GPU LLaVA recipes; issue 8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.config import ProjectorConfig
from mm_jax.models.layers import ACTIVATIONS, Dense


class Projector(nnx.Module):
  """float[M, P, D_in] -> float[M, P, D]."""

  def __init__(self, cfg: ProjectorConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.kind = cfg.kind
    self.fc1 = Dense((d_in,), (d_out,), ("vision_embed", "embed"), **kw)
    self.fc2 = (Dense((d_out,), (d_out,), ("mlp", "embed"), **kw)
                if cfg.kind == "mlp2x_gelu" else None)
    # One assignment: nnx fixes an attribute's data/static status at its first one (None).
    self.res = (nnx.List([
        nnx.List([Dense((d_out,), (d_out,), ("embed", "mlp"), **kw),
                  Dense((d_out,), (d_out,), ("mlp", "embed"), **kw)])
        for _ in range(cfg.depth)]) if cfg.kind == "residual_mlp" else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    gelu = ACTIVATIONS["gelu"]
    x = self.fc1(x)
    if self.fc2 is not None:
      x = self.fc2(gelu(x))
    if self.res is not None:
      for w1, w2 in self.res:
        x = x + w2(gelu(w1(x)))
    return x
