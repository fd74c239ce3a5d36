"""LLaMA-family decoder: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention.

Covers LLaMA-1/2/3, Vicuna, TinyLlama and Mistral (without sliding window) through
`DecoderConfig`. The decoder sees only embeddings: `MultimodalModel` looks up text
embeddings with `embed`, merges media rows in, and calls `__call__` on the result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax import sharding
from mm_jax.config import DecoderConfig
from mm_jax.models import attention
from mm_jax.models.layers import Dense, RMSNorm, param, rope


class DecoderBlock(nnx.Module):
  def __init__(self, cfg: DecoderConfig, *, attention_impl: str, rngs: nnx.Rngs, dtype,
               param_dtype):
    d, n, k, h, f = cfg.width, cfg.heads, cfg.kv_heads, cfg.head_size, cfg.mlp_dim
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm = dict(eps=cfg.norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attn_norm = RMSNorm(d, "embed", **norm)
    self.q = Dense((d,), (n, h), ("embed", "heads", "head_dim"), **kw)
    self.k = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), **kw)
    self.v = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), **kw)
    self.o = Dense((n, h), (d,), ("heads", "head_dim", "embed"), **kw)
    self.mlp_norm = RMSNorm(d, "embed", **norm)
    self.gate = Dense((d,), (f,), ("embed", "mlp"), **kw)
    self.up = Dense((d,), (f,), ("embed", "mlp"), **kw)
    self.down = Dense((f,), (d,), ("mlp", "embed"), **kw)
    self.rope_theta = cfg.rope_theta
    self.attention_impl = attention_impl

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """x float[B, T, D], positions/segment_ids int32[B, T] -> float[B, T, D]."""
    y = self.attn_norm(x)
    q = rope(self.q(y), positions, self.rope_theta)  # [B, T, N, H]
    k = rope(self.k(y), positions, self.rope_theta)  # [B, T, K, H]
    out = attention.attend(q, k, self.v(y), segment_ids=segment_ids, causal=True,
                           impl=self.attention_impl)
    x = x + self.o(out)
    y = self.mlp_norm(x)
    return x + self.down(jax.nn.silu(self.gate(y)) * self.up(y))


class Decoder(nnx.Module):
  def __init__(self, cfg: DecoderConfig, *, attention_impl: str = "xla", remat: bool = False,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    init = jax.nn.initializers.normal(0.02)
    self.embedding = param(rngs, init, (cfg.vocab_size, cfg.width), ("vocab", "embed"),
                           param_dtype)
    self.layers = nnx.List([DecoderBlock(cfg, attention_impl=attention_impl, **kw)
                            for _ in range(cfg.depth)])
    self.norm = RMSNorm(cfg.width, "embed", eps=cfg.norm_eps, **kw)
    self.lm_head = (None if cfg.tie_embeddings else
                    Dense((cfg.width,), (cfg.vocab_size,), ("embed", "vocab"), use_bias=False,
                          std=0.02, **kw))
    self.remat, self.dtype = remat, dtype

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int32[B, T] -> float[B, T, D]; ids outside the vocabulary (placeholders) read row 0."""
    # Gather from a table whole along its width (FSDP gathers it anyway): a gather out of
    # a width-sharded table cannot be resharded to batch-sharded rows without a full copy.
    table = sharding.constrain(self.embedding[...], "vocab", "act_embed")
    ids = jnp.where((tokens >= 0) & (tokens < table.shape[0]), tokens, 0)
    rows = jnp.take(table, ids, axis=0).astype(self.dtype)
    return sharding.constrain(rows, "act_batch", "act_seq", "act_embed")

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """x float[B, T, D] -> logits float32[B, T, V]."""
    for layer in self.layers:
      call = nnx.remat(lambda b, *a: b(*a)) if self.remat else (lambda b, *a: b(*a))
      with jax.named_scope("decoder_block"):
        x = sharding.constrain(call(layer, x, positions, segment_ids),
                               "act_batch", "act_seq", "act_embed")
    x = self.norm(x)
    if self.lm_head is None:
      logits = jnp.einsum("BTD,VD->BTV", x, self.embedding[...].astype(self.dtype))
    else:
      logits = self.lm_head(x)
    return sharding.constrain(logits.astype(jnp.float32), "act_batch", "act_seq", "act_vocab")
