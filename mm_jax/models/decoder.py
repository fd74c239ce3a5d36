"""LLaMA-family decoder: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, KV cache.

Covers LLaMA-1/2/3, Vicuna, TinyLlama and Mistral (without sliding window) through
`DecoderConfig`. The decoder sees only embeddings: `MultimodalModel` looks up text
embeddings with `embed`, merges media rows in, and calls `__call__` on the result
(training) or `step` with a `KVCache` (generation: one prefill call, then one token per
call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mm_jax import sharding
from mm_jax.config import DecoderConfig
from mm_jax.models import attention
from mm_jax.models.layers import Dense, RMSNorm, param, rope


@struct.dataclass
class KVCache:
  """Keys and values of every layer, in cache slots [0, S).

  k, v: per layer float[B, S, K, H]; valid bool[B, S]: slot written by a real token (left
  padding of shorter prompts stays false); index: the next slot to write (the same for all
  rows: rows differ only in how much left padding they carry).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array


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

  def _qkv(self, x: jax.Array, positions: jax.Array):
    """q float[B, T, N, H], k and v float[B, T, K, H], rotary applied to q and k."""
    y = self.attn_norm(x)
    q = rope(self.q(y), positions, self.rope_theta)
    return q, rope(self.k(y), positions, self.rope_theta), self.v(y)

  def _out(self, x: jax.Array, attended: jax.Array) -> jax.Array:
    """Output projection, residual and the MLP half of the block."""
    x = x + self.o(attended)
    y = self.mlp_norm(x)
    return x + self.down(jax.nn.silu(self.gate(y)) * self.up(y))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """x float[B, T, D], positions/segment_ids int32[B, T] -> float[B, T, D]."""
    q, k, v = self._qkv(x, positions)
    out = attention.attend(q, k, v, segment_ids=segment_ids, causal=True,
                           impl=self.attention_impl)
    return self._out(x, out)

  def step(self, x: jax.Array, positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
           valid: jax.Array, index: jax.Array):
    """x float[B, T, D] at cache slots [index, index + T) -> (float[B, T, D], k, v cache).

    `valid` bool[B, S] already marks this call's real tokens; slot order is time order,
    so causality is "key slot <= query slot".
    """
    q, k, v = self._qkv(x, positions)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, 1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, 1)
    out = attention.attend_cached(q, k_cache, v_cache, valid=valid, index=index)
    return self._out(x, out), k_cache, v_cache


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
    self.cache_shape = (cfg.depth, cfg.kv_heads, cfg.head_size)  # L, K, H

  def init_cache(self, batch: int, slots: int) -> KVCache:
    """An empty KVCache of `slots` positions per row, in the compute dtype."""
    depth, kv_heads, head_size = self.cache_shape
    zeros = tuple(jnp.zeros((batch, slots, kv_heads, head_size), self.dtype)
                  for _ in range(depth))
    return KVCache(zeros, zeros, jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))

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
    return self._logits(x)

  def _logits(self, x: jax.Array) -> jax.Array:
    """Final norm and the vocabulary projection: float[B, T, D] -> float32[B, T, V]."""
    x = self.norm(x)
    if self.lm_head is None:
      logits = jnp.einsum("BTD,VD->BTV", x, self.embedding[...].astype(self.dtype))
    else:
      logits = self.lm_head(x)
    return sharding.constrain(logits.astype(jnp.float32), "act_batch", "act_seq", "act_vocab")

  def step(self, x: jax.Array, positions: jax.Array, token_valid: jax.Array, cache: KVCache
           ) -> tuple[jax.Array, KVCache]:
    """Generation: x float[B, T, D] (a prompt, or T = 1 new token) -> logits, new cache.

    positions int32[B, T] (RoPE, per row); token_valid bool[B, T] (false on left padding).
    """
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_valid, cache.index, 1)
    ks, vs = [], []
    for layer, k, v in zip(self.layers, cache.k, cache.v, strict=True):
      with jax.named_scope("decoder_block"):
        x, k, v = layer.step(x, positions, k, v, valid, cache.index)
      ks.append(k)
      vs.append(v)
    new = KVCache(tuple(ks), tuple(vs), valid, cache.index + x.shape[1])
    return self._logits(x), new
