"""Multimodal token merge: media rows replace placeholder embeddings.

`merge_tokens(text_emb float[B, T, D], media_emb float[M, D], media_index int32[B, T])`
returns float[B, T, D] where row (b, t) is `media_emb[media_index[b, t]]` if that index is
>= 0, else `text_emb[b, t]`. The Pallas kernel (forward writes only media rows, backward
gathers them back) is issue 3; `impl` selects it once it exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_tokens_reference(text_emb: jax.Array, media_emb: jax.Array,
                           media_index: jax.Array) -> jax.Array:
  """XLA where+gather merge; differentiable through jnp."""
  rows = jnp.take(media_emb, jnp.maximum(media_index, 0), axis=0).astype(text_emb.dtype)
  return jnp.where((media_index >= 0)[..., None], rows, text_emb)


def merge_tokens(text_emb: jax.Array, media_emb: jax.Array, media_index: jax.Array, *,
                 impl: str = "auto") -> jax.Array:
  if impl == "pallas":
    raise NotImplementedError("model.merge=pallas: the Pallas merge kernel is issue 3; "
                              "use xla or auto")
  with jax.named_scope("merge_tokens"):
    return merge_tokens_reference(text_emb, media_emb, media_index)
