"""Causal decoder with grouped-query attention, RoPE and a KV cache, for two families.

`DecoderConfig` picks the block: LLaMA-1/2/3, Vicuna, TinyLlama and Mistral (without
sliding window): RMSNorm, sequential attention then SwiGLU MLP, full RoPE; Phi-1/1.5/2:
LayerNorm, attention and GELU MLP in parallel off one norm, partial RoPE, biases.

The decoder sees only embeddings: `MultimodalModel` looks up text embeddings with `embed`,
merges media rows in, and calls `__call__` on the result (training) or `step` with a
`KVCache` (generation: one prefill call, then one token per call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mm_jax import sharding
from mm_jax.config import DecoderConfig
from mm_jax.models import attention, remat
from mm_jax.models.layers import Dense, LayerNorm, RMSNorm, param, rope
from mm_jax.models.stack import Stack


@struct.dataclass
class KVCache:
  """Keys and values of every layer, in cache slots [0, S).

  k, v: per layer float[B, S, K, H] (a tuple of L), or one float[L, B, S, K, H] for a
  scanned stack (models/stack.py); valid bool[B, S]: slot written by a real token (left
  padding of shorter prompts stays false); index: the next slot to write (the same for all
  rows: rows differ only in how much left padding they carry).
  """

  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  valid: jax.Array
  index: jax.Array


def _norm(cfg: DecoderConfig, **kw) -> RMSNorm | LayerNorm:
  cls = RMSNorm if cfg.norm == "rms" else LayerNorm
  return cls(cfg.width, "embed", eps=cfg.norm_eps, **kw)


class DecoderBlock(nnx.Module):
  """Parameter names follow the family: LLaMA attn_norm, q/k/v/o, mlp_norm, gate/up/down;
  Phi attn_norm (the only norm), q/k/v/o, fc1/fc2; biases where the config asks."""

  def __init__(self, cfg: DecoderConfig, *, attention_impl: str, rngs: nnx.Rngs, dtype,
               param_dtype):
    d, n, k, h, f = cfg.width, cfg.heads, cfg.kv_heads, cfg.head_size, cfg.mlp_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    att = dict(use_bias=cfg.attention_bias, **kw)
    mlp = dict(use_bias=cfg.mlp_bias, **kw)
    self.attn_norm = _norm(cfg, **kw)
    self.q = Dense((d,), (n, h), ("embed", "heads", "head_dim"), **att)
    self.k = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), **att)
    self.v = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), **att)
    self.o = Dense((n, h), (d,), ("heads", "head_dim", "embed"), **att)
    self.mlp_norm = None if cfg.parallel_block else _norm(cfg, **kw)
    if cfg.mlp == "swiglu":
      self.gate = Dense((d,), (f,), ("embed", "mlp"), **mlp)
      self.up = Dense((d,), (f,), ("embed", "mlp"), **mlp)
      self.down = Dense((f,), (d,), ("mlp", "embed"), **mlp)
    else:
      self.fc1 = Dense((d,), (f,), ("embed", "mlp"), **mlp)
      self.fc2 = Dense((f,), (d,), ("mlp", "embed"), **mlp)
    self.mlp_kind, self.parallel = cfg.mlp, cfg.parallel_block
    self.rope_theta, self.rotary_dims = cfg.rope_theta, cfg.rotary_dims
    self.attention_impl = attention_impl

  def _qkv(self, y: jax.Array, positions: jax.Array):
    """y (normed) float[B, T, D] -> q float[B, T, N, H], k and v float[B, T, K, H], rotary
    applied to the leading rotary_dims of q and k."""
    rot = lambda x: rope(x, positions, self.rope_theta, self.rotary_dims)
    return rot(self.q(y)), rot(self.k(y)), self.v(y)

  def _mlp(self, y: jax.Array) -> jax.Array:
    if self.mlp_kind == "swiglu":
      return self.down(jax.nn.silu(self.gate(y)) * self.up(y))
    # Phi's hidden_act "gelu_new" is the tanh approximation.
    return self.fc2(jax.nn.gelu(self.fc1(y), approximate=True))

  def _out(self, x: jax.Array, y: jax.Array, attended: jax.Array) -> jax.Array:
    """Output projection, residuals and the MLP half: parallel (Phi) off the same normed
    y, else sequential (LLaMA) off its own norm."""
    if self.parallel:
      return x + self.o(attended) + self._mlp(y)
    x = x + self.o(attended)
    return x + self._mlp(self.mlp_norm(x))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """x float[B, T, D], positions/segment_ids int32[B, T] -> float[B, T, D]."""
    y = self.attn_norm(x)
    q, k, v = self._qkv(y, positions)
    out = attention.attend(q, k, v, segment_ids=segment_ids, causal=True,
                           impl=self.attention_impl)
    return self._out(x, y, out)

  def step(self, x: jax.Array, positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
           valid: jax.Array, index: jax.Array):
    """x float[B, T, D] at cache slots [index, index + T) -> (float[B, T, D], k, v cache).

    `valid` bool[B, S] already marks this call's real tokens; slot order is time order,
    so causality is "key slot <= query slot".
    """
    y = self.attn_norm(x)
    q, k, v = self._qkv(y, positions)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, 1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, 1)
    out = attention.attend_cached(q, k_cache, v_cache, valid=valid, index=index)
    return self._out(x, y, out), k_cache, v_cache


class Decoder(nnx.Module):
  def __init__(self, cfg: DecoderConfig, *, attention_impl: str = "xla", remat: str = "none",
               scan: bool = False, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    init = jax.nn.initializers.normal(0.02)
    self.embedding = param(rngs, init, (cfg.vocab_size, cfg.width), ("vocab", "embed"),
                           param_dtype)
    block = lambda: DecoderBlock(cfg, attention_impl=attention_impl, **kw)
    self.layers = (Stack(block, cfg.depth) if scan
                   else nnx.List([block() for _ in range(cfg.depth)]))
    self.norm = _norm(cfg, **kw)
    self.lm_head = (None if cfg.tie_embeddings else
                    Dense((cfg.width,), (cfg.vocab_size,), ("embed", "vocab"),
                          use_bias=cfg.lm_head_bias, std=0.02, **kw))
    # PhiForCausalLM ties only lm_head.weight to the table; its bias stays its own.
    self.lm_bias = (param(rngs, jax.nn.initializers.zeros, (cfg.vocab_size,), ("vocab",),
                          param_dtype) if cfg.tie_embeddings and cfg.lm_head_bias else None)
    self.remat, self.dtype = remat, dtype
    self.cache_shape = (cfg.depth, cfg.kv_heads, cfg.head_size)  # L, K, H

  def init_cache(self, batch: int, slots: int) -> KVCache:
    """An empty KVCache of `slots` positions per row, in the compute dtype."""
    depth, kv_heads, head_size = self.cache_shape
    if isinstance(self.layers, Stack):
      zeros = jnp.zeros((depth, batch, slots, kv_heads, head_size), self.dtype)
    else:
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
    project, head = self.head()
    return project(head, self.hidden(x, positions, segment_ids))

  def hidden(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """x float[B, T, D] -> the final norm's output float[B, T, D] (what `head` projects)."""
    if isinstance(self.layers, Stack):
      def body(block, x, positions, segment_ids):
        with jax.named_scope("decoder_block"):
          return sharding.constrain(block(x, positions, segment_ids),
                                    "act_batch", "act_seq", "act_embed")
      x = self.layers.run(body, x, positions, segment_ids, remat=self.remat)
      return self.norm(x)
    for layer in self.layers:
      call = remat.wrap(lambda b, *a: b(*a), self.remat)
      with jax.named_scope("decoder_block"):
        x = sharding.constrain(call(layer, x, positions, segment_ids),
                               "act_batch", "act_seq", "act_embed")
    return self.norm(x)

  def head(self) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """(project, params): project(params, h float[B, T, D]) -> logits float32[B, T, V], a
    pure function of its arguments, so a scan or remat body (train/losses.py) can take the
    vocabulary projection a chunk of positions at a time."""
    if self.lm_head is None:  # tied to the table (+ Phi's own bias)
      params = (self.embedding[...], None if self.lm_bias is None else self.lm_bias[...])
      dtype = self.dtype

      def project(p, h):
        logits = jnp.einsum("BTD,VD->BTV", h, p[0].astype(dtype))
        return _vocab_logits(logits if p[1] is None else logits + p[1].astype(dtype))
      return project, params
    graphdef, params = nnx.split(self.lm_head)
    return lambda p, h: _vocab_logits(nnx.merge(graphdef, p)(h)), params

  def _logits(self, x: jax.Array) -> jax.Array:
    """Final norm and the vocabulary projection: float[B, T, D] -> float32[B, T, V]."""
    project, head = self.head()
    return project(head, self.norm(x))

  def step(self, x: jax.Array, positions: jax.Array, token_valid: jax.Array, cache: KVCache
           ) -> tuple[jax.Array, KVCache]:
    """Generation: x float[B, T, D] (a prompt, or T = 1 new token) -> logits, new cache.

    positions int32[B, T] (RoPE, per row); token_valid bool[B, T] (false on left padding).
    """
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_valid, cache.index, 1)
    if isinstance(self.layers, Stack):
      def body(block, x, valid, index, kv):
        with jax.named_scope("decoder_block"):
          x, k, v = block.step(x, positions, kv[0], kv[1], valid, index)
        return x, (k, v)
      x, (k, v) = self.layers.run(body, x, valid, cache.index, xs=(cache.k, cache.v))
      return self._logits(x), KVCache(k, v, valid, cache.index + x.shape[1])
    ks, vs = [], []
    for layer, k, v in zip(self.layers, cache.k, cache.v, strict=True):
      with jax.named_scope("decoder_block"):
        x, k, v = layer.step(x, positions, k, v, valid, cache.index)
      ks.append(k)
      vs.append(v)
    new = KVCache(tuple(ks), tuple(vs), valid, cache.index + x.shape[1])
    return self._logits(x), new


def _vocab_logits(logits: jax.Array) -> jax.Array:
  return sharding.constrain(logits.astype(jnp.float32), "act_batch", "act_seq", "act_vocab")
