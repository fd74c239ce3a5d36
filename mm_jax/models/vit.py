"""CLIP and SigLIP vision towers (ViT), with LLaVA's feature-layer selection.

CLIP (Radford et al. 2021): class token, pre-LN before the encoder, quick_gelu.
SigLIP (Zhai et al. 2023): no class token, bias on the patch embedding, gelu-tanh.
Both: pre-LN transformer blocks; `hidden_states` index as in transformers (0 =
embeddings, i = after block i). The final LayerNorm never feeds LLaVA's features: SigLIP
applies it in `last_hidden_state`, CLIP only to the pooled class token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax import sharding
from mm_jax.config import VisionConfig
from mm_jax.models import attention, remat
from mm_jax.models.layers import ACTIVATIONS, Dense, LayerNorm, param
from mm_jax.models.stack import Stack


class VisionBlock(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

  def __init__(self, cfg: VisionConfig, *, attention_impl: str, rngs: nnx.Rngs, dtype,
               param_dtype):
    d, n = cfg.width, cfg.heads
    h = d // n
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.ln1 = LayerNorm(d, "vision_embed", eps=cfg.layer_norm_eps, **kw)
    self.q = Dense((d,), (n, h), ("vision_embed", "vision_heads", "head_dim"), use_bias=True, **kw)
    self.k = Dense((d,), (n, h), ("vision_embed", "vision_heads", "head_dim"), use_bias=True, **kw)
    self.v = Dense((d,), (n, h), ("vision_embed", "vision_heads", "head_dim"), use_bias=True, **kw)
    self.o = Dense((n, h), (d,), ("vision_heads", "head_dim", "vision_embed"), use_bias=True, **kw)
    self.ln2 = LayerNorm(d, "vision_embed", eps=cfg.layer_norm_eps, **kw)
    self.fc1 = Dense((d,), (cfg.mlp_dim,), ("vision_embed", "vision_mlp"), use_bias=True, **kw)
    self.fc2 = Dense((cfg.mlp_dim,), (d,), ("vision_mlp", "vision_embed"), use_bias=True, **kw)
    self.act = "quick_gelu" if cfg.kind == "clip" else "gelu_tanh"
    self.attention_impl = attention_impl

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[M, P, D] -> float[M, P, D]."""
    y = self.ln1(x)
    out = attention.attend(self.q(y), self.k(y), self.v(y), segment_ids=None, causal=False,
                           impl=self.attention_impl, heads=("vision_heads", "vision_heads"))
    x = x + self.o(out)
    return x + self.fc2(ACTIVATIONS[self.act](self.fc1(self.ln2(x))))


def _scanned(block: VisionBlock, x: jax.Array) -> jax.Array:
  """One layer of a scanned stack, as the unrolled loop runs it."""
  with jax.named_scope("vision_block"):
    return sharding.constrain(block(x), "act_batch", "act_seq", "act_embed")


class VisionTower(nnx.Module):
  """images float[M, H, W, 3] (normalised) -> features float[M, P', D_v]."""

  def __init__(self, cfg: VisionConfig, *, attention_impl: str = "xla", remat: str = "none",
               scan: bool = False, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.cfg = cfg
    d, p = cfg.width, cfg.patch_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    clip = cfg.kind == "clip"
    self.patch = Dense((p, p, 3), (d,), (None, None, None, "vision_embed"), use_bias=not clip,
                       **kw)
    init = jax.nn.initializers.normal(0.02)
    self.cls = param(rngs, init, (d,), ("vision_embed",), param_dtype) if clip else None
    self.pos = param(rngs, init, (cfg.num_patches + clip, d), (None, "vision_embed"), param_dtype)
    self.pre_ln = LayerNorm(d, "vision_embed", eps=cfg.layer_norm_eps, **kw) if clip else None
    block = lambda: VisionBlock(cfg, attention_impl=attention_impl, **kw)
    self.blocks = (Stack(block, cfg.depth) if scan
                   else nnx.List([block() for _ in range(cfg.depth)]))
    self.post_ln = LayerNorm(d, "vision_embed", eps=cfg.layer_norm_eps, **kw)
    self.remat, self.dtype = remat, dtype

  def embed(self, images: jax.Array) -> jax.Array:
    """float[M, H, W, 3] -> float[M, P(+1), D]: hidden_states[0]."""
    m, hh, ww, c = images.shape
    p = self.cfg.patch_size
    patches = images.reshape(m, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.patch(patches.reshape(m, -1, p, p, c))  # "MPppc,ppcD->MPD"
    if self.cls is not None:
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (m, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos[...].astype(x.dtype)
    return self.pre_ln(x) if self.pre_ln is not None else x

  def hidden_states(self, images: jax.Array, upto: int | None = None) -> list[jax.Array]:
    """[embeddings, after block 1, ..., after block `upto`] (default: all blocks)."""
    upto = len(self.blocks) if upto is None else upto
    states = [self.embed(images)]
    if isinstance(self.blocks, Stack):
      if upto == 0:
        return states
      _, ys = self.blocks.run(_scanned, states[0], upto=upto, remat=self.remat, collect=True)
      return states + [ys[i] for i in range(upto)]
    for block in list(self.blocks)[:upto]:
      call = remat.wrap(lambda b, x: b(x), self.remat)
      with jax.named_scope("vision_block"):
        states.append(sharding.constrain(call(block, states[-1]),
                                         "act_batch", "act_seq", "act_embed"))
    return states

  def last_hidden_state(self, images: jax.Array) -> jax.Array:
    """As transformers: SigLIP applies the final LayerNorm to every token, CLIP to none."""
    x = self.hidden_states(images)[-1]
    return x if self.cls is not None else self.post_ln(x)

  def pooled(self, images: jax.Array) -> jax.Array:
    """CLIP's pooler output: the final LayerNorm of the class token, float[M, D]."""
    if self.cls is None:
      raise ValueError("pooled() needs a class token (CLIP); SigLIP pools with its MAP head")
    return self.post_ln(self.hidden_states(images)[-1][:, 0])

  def __call__(self, images: jax.Array) -> jax.Array:
    """LLaVA features: hidden_states[feature_layer], class token dropped for `patch`."""
    layer = self.cfg.feature_layer % (self.cfg.depth + 1)
    if isinstance(self.blocks, Stack):  # only the last state: no [upto, ...] stack of them
      x = self.embed(images)
      x = self.blocks.run(_scanned, x, upto=layer, remat=self.remat) if layer else x
    else:
      x = self.hidden_states(images, upto=layer)[layer]
    if self.cls is not None and self.cfg.feature_select == "patch":
      x = x[:, 1:]
    return x
