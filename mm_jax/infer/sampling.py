"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """logits float32[B, V] -> token ids int32[B].

  temperature 0 is greedy (argmax; ties go to the lowest id, as torch.argmax). Otherwise
  the logits are divided by the temperature, cut to the `top_k` largest (0: no cut) and
  to the smallest set whose probability reaches `top_p` (1: no cut), then sampled.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  floor = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, floor, logits)
  if top_p < 1.0:
    logits = jnp.where(logits < _nucleus_floor(logits, top_p), floor, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _nucleus_floor(logits: jax.Array, top_p: float) -> jax.Array:
  """float32[B, 1]: the smallest logit kept by top-p.

  Sorted descending, a token is kept while the probability mass *before* it is below
  top_p, so the most likely token always survives.
  """
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  kept = before < top_p
  return jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
