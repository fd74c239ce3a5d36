"""Attention backend switch: `model.attention = xla | cudnn | pallas | auto`.

All backends take q float[B, T, N, H], k/v float[B, S, K, H] (N a multiple of K) and
segment_ids int32[B, T] (packed samples; a token attends only inside its own segment).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mm_jax import sharding, target
from mm_jax.kernels import choice
from mm_jax.kernels.attention import flash_attention


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array) -> jax.Array:
  """bool[B, 1, T, S]: true where query and key belong to the same packed sample."""
  return (q_segments[:, :, None] == kv_segments[:, None, :])[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None,
           causal: bool, impl: str, heads: tuple[str, str] = ("heads", "kv_heads")
           ) -> jax.Array:
  """float[B, T, N, H] attention output; softmax in float32 inside the backends.

  `heads`: logical names of the query and key/value head axes (for the Pallas path's
  shard_map; the towers use their own).
  """
  if impl == "auto":  # a module built from an unresolved config: the target's pick
    impl = choice.attention(target.current(), q.dtype, (q.shape[-1],)).impl
  if impl == "cudnn" and (q.shape[1] % 2 or k.shape[1] % 2):
    impl = choice.cudnn_odd_length(q.shape[1], k.shape[1])
  if impl == "pallas":  # on CPU this runs the kernels in the Pallas interpreter
    with jax.named_scope("attention_pallas"):
      return _pallas_sharded(q, k, v, segment_ids, causal, heads)
  mask = None if segment_ids is None else segment_mask(segment_ids, segment_ids)
  with jax.named_scope(f"attention_{impl}"):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        implementation=impl)


def attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, *, valid: jax.Array,
                  index: jax.Array) -> jax.Array:
  """Attention of new queries over a KV cache: float[B, T, N, H].

  q float[B, T, N, H] at cache slots [index, index + T); k/v float[B, S, K, H] the whole
  cache; valid bool[B, S] the slots holding real tokens. Plain XLA: decoding reads the
  cache once per token (memory bound), and a prefill of T tokens costs T x S scores.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)  # GQA: G = N / K query heads share one kv head
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
  scores *= h ** -0.5
  causal = jnp.arange(k.shape[1])[None, :] <= index + jnp.arange(t)[:, None]  # [T, S]
  mask = valid[:, None, None, None, :] & causal[None, None, None]
  # A finite floor, not -inf: a left-padding query sees no valid key and must not NaN.
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def _pallas_sharded(q, k, v, segment_ids, causal, heads):
  """flash_attention per shard: XLA cannot partition a Pallas call, so under a mesh the
  kernel runs inside shard_map on each device's batch rows and heads."""
  kernel = lambda q, k, v, s: flash_attention(q, k, v, segment_ids=s, causal=causal)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q, k, v, segment_ids)
  batch = sharding.spec_for(("act_batch",), q.shape[:1], mesh)[0]
  qh = sharding.spec_for((heads[0],), q.shape[2:3], mesh)[0]
  kh = sharding.spec_for((heads[1],), k.shape[2:3], mesh)[0]
  if qh != kh:  # a GQA group must stay on one device
    qh = kh = None
  q_spec, kv_spec = P(batch, None, qh, None), P(batch, None, kh, None)
  seg = segment_ids if segment_ids is not None else jnp.ones(q.shape[:2], jnp.int32)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)),
                       out_specs=q_spec, check_vma=False)(q, k, v, seg)
