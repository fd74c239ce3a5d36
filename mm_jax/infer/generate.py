"""Prefill + decode with a KV cache, for batches of prompts of different lengths.

Prompts are left-padded to one width T, so every row's last prompt token sits in slot
T - 1 and every decode step writes the same slot for all rows; `positions` count only real
tokens, so RoPE sees each prompt as if it were alone. Media are merged once, at prefill
(`MultimodalModel.embed`); decode steps embed one text token per row.

Given a mesh, a Generator runs one SPMD decode over it for every process at once: each process
hands in its own rows, the parameters stay sharded as they are, and each gets its rows back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax import sharding
from mm_jax.infer.sampling import sample
from mm_jax.models.multimodal import MultimodalModel


@dataclasses.dataclass(frozen=True)
class Decoding:
  """Static decoding settings (hashable: part of the jit cache key)."""

  max_new_tokens: int = 32
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: no cut
  top_p: float = 1.0  # 1: no cut
  stop_ids: tuple[int, ...] = ()  # a row ends after emitting one of these
  pad_id: int = 0  # written after a row has ended


def left_pad(prompts: Sequence[np.ndarray], pad_id: int, multiple: int = 8, width: int = 0
             ) -> dict[str, np.ndarray]:
  """int32 id lists -> tokens/positions int32[B, T], token_valid bool[B, T], lengths int32[B].

  T is the longest prompt, or `width` if wider, rounded up to `multiple` (fewer distinct
  shapes to compile).
  """
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min(initial=1) < 1:
    raise ValueError("every prompt needs at least one token")
  t = -(-max(int(lengths.max()), width) // multiple) * multiple
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  for row, p in enumerate(prompts):
    tokens[row, t - len(p):] = p
  pad = (t - lengths)[:, None]
  cols = np.arange(t)[None, :]
  return {"tokens": tokens, "token_valid": cols >= pad,
          "positions": np.maximum(cols - pad, 0).astype(np.int32), "lengths": lengths}


def decode(graphdef, settings: Decoding, state, batch: dict, key: jax.Array) -> jax.Array:
  """int32[B, max_new_tokens]: generated ids, `pad_id` after a row's stop token."""
  model: MultimodalModel = nnx.merge(graphdef, state)
  dec, s = model.decoder, settings
  b, t = batch["tokens"].shape
  pick = functools.partial(sample, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
  stops = jnp.asarray(s.stop_ids or (-1,), jnp.int32)

  cache = dec.init_cache(b, t + s.max_new_tokens)
  logits, cache = dec.step(model.embed(batch), batch["positions"], batch["token_valid"], cache)
  key, sub = jax.random.split(key)
  first = pick(logits[:, -1], sub)
  out = jnp.full((b, s.max_new_tokens), s.pad_id, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stops)

  def body(carry):
    i, token, done, cache, out, key = carry
    position = (batch["lengths"] + i - 1)[:, None]  # token i-1 sits right after the prompt
    logits, cache = dec.step(dec.embed(token[:, None]), position, jnp.ones((b, 1), bool),
                             cache)
    key, sub = jax.random.split(key)
    token = jnp.where(done, s.pad_id, pick(logits[:, 0], sub))
    return i + 1, token, done | jnp.isin(token, stops), cache, out.at[:, i].set(token), key

  cond = lambda carry: (carry[0] < s.max_new_tokens) & ~jnp.all(carry[2])
  return jax.lax.while_loop(cond, body, (1, first, done, cache, out, key))[4]


class Generator:
  """A model split once and its decode function jitted per (settings, batch shapes).

  With `mesh`, each call is one decode over the mesh (a collective: every process calls it as
  often, with the same shapes): `batch` holds this process's rows, laid out over the
  data-parallel devices as a training batch, and the ids of those rows come back.
  """

  def __init__(self, model: MultimodalModel, settings: Decoding,
               mesh: jax.sharding.Mesh | None = None):
    self.graphdef, self.state = nnx.split(model)
    self.settings, self.mesh = settings, mesh
    # The output laid out as the input rows, so each process reads its rows off its shards.
    out = {} if mesh is None else {"out_shardings": sharding.batch_sharding(mesh, 2)}
    self._fn = jax.jit(functools.partial(decode, self.graphdef, settings), **out)

  def __call__(self, batch: dict, seed: int = 0) -> list[list[int]]:
    """batch: left_pad's keys plus `images`/`image_valid` -> each row's ids, up to and
    including its stop token."""
    if self.mesh is None:
      out = np.asarray(self._fn(self.state, dict(batch), jax.random.key(seed)))
    else:
      arrays = {k: jax.make_array_from_process_local_data(
          sharding.batch_sharding(self.mesh, np.ndim(v)), v) for k, v in batch.items()}
      with jax.set_mesh(self.mesh):
        out = local_rows(self._fn(self.state, arrays, jax.random.key(seed)))
    return [trim(row, self.settings.stop_ids, self.settings.pad_id) for row in out]


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array sharded over its leading axis: its shards in row
  order, each once (a shard replicated over other mesh axes is the same rows). The rows
  jax.make_array_from_process_local_data took from this process, in the order it took them."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def trim(row: np.ndarray, stop_ids: Sequence[int], pad_id: int) -> list[int]:
  """Ids up to and including the first stop id (all of them when none stops)."""
  ids = [int(i) for i in row]
  for n, i in enumerate(ids):
    if i in stop_ids:
      return ids[:n + 1]
  return ids
