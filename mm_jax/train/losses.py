"""Cross entropy a chunk of sequence positions at a time: float32 [B, T, V] logits never
exist, in the forward pass or the backward.

The decoder's final hidden states h float[B, T, D] are cut into chunks of C positions. A
`lax.scan` over the chunks projects each to float32 [B, C, V] logits, takes the cross
entropy and the argmax, and keeps only those [B, C] results. Its body is rematerialised
(`jax.checkpoint`), so what the backward pass saves per chunk is the body's input (the
h slice, already live), never the logits: the backward recomputes one chunk's logits at a
time and accumulates the head's gradient across chunks. This is a property of the
program's structure (a scan carries nothing else), not of barriers a backend may strip.
MaxText's vocabulary tiling takes the same approach; chunks run along the sequence here,
which keeps the batch sharding of the activations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def cross_entropy(project: Callable[[Any, jax.Array], jax.Array], head: Any, h: jax.Array,
                  targets: jax.Array, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Per-position cross entropy float32[B, T] and argmax prediction int32[B, T].

  project(head, h float[B, C, D]) -> logits float32[B, C, V] (Decoder.head). chunk: the
  positions per chunk; 0 or >= T computes all positions at once (the plain path). A T
  that is not a multiple of `chunk` is padded (the padded positions are cut off again).
  """
  b, t, d = h.shape
  if not chunk or chunk >= t:
    logits = project(head, h)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, targets),
            logits.argmax(-1).astype(jnp.int32))
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  hs = h.reshape(b, n, chunk, d).swapaxes(0, 1)  # [N, B, C, D]
  ts = targets.reshape(b, n, chunk).swapaxes(0, 1)  # [N, B, C]

  @jax.checkpoint
  def one(head, hc, tc):
    logits = project(head, hc)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, tc),
            logits.argmax(-1).astype(jnp.int32))

  def body(carry, xs):
    return carry, one(head, *xs)

  _, (ce, pred) = jax.lax.scan(body, None, (hs, ts))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  return unchunk(ce), unchunk(pred)
