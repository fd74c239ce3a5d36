"""MultimodalModel: per-modality tower + projector, one merge, one decoder.

A modality is (tower, projector, placeholder token id, batch keys). Its items are encoded
to float[M_m, P_m, D] and flattened; all modalities' rows are concatenated and merged in
one `merge_tokens` call by DESIGN.md's rule: the k-th placeholder of modality m in a
row-major walk over `tokens` takes the k-th row of modality m's *valid* items. The
decoder never knows which rows came from media.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mm_jax import sharding
from mm_jax.config import ModelConfig
from mm_jax.kernels.merge import merge_tokens
from mm_jax.models import attention
from mm_jax.models.decoder import Decoder
from mm_jax.models.projector import Projector
from mm_jax.models.vit import VisionTower


@dataclasses.dataclass(frozen=True)
class Modality:
  name: str  # key in `towers` / `projectors`, e.g. "image"
  token_id: int  # placeholder id in `tokens`
  items_key: str  # batch key of the items, e.g. "images"
  valid_key: str  # batch key of bool[M_m], e.g. "image_valid"
  tokens_per_item: int  # P_m: placeholders per item


def media_index(tokens: jax.Array, token_id: int, valid: jax.Array, tokens_per_item: int,
                base: int) -> jax.Array:
  """int32[B, T]: row of the merged media table for each placeholder, -1 elsewhere.

  E.g. P=2, valid=[T, F, T] and one row `a <i> <i> b <i> <i>`: the first two
  placeholders take item slot 0 (rows base+0, base+1), the next two skip the invalid
  slot 1 and take slot 2 (rows base+4, base+5).
  """
  is_ph = tokens == token_id
  k = jnp.cumsum(is_ph.reshape(-1).astype(jnp.int32)).reshape(tokens.shape) - 1
  item, within = k // tokens_per_item, k % tokens_per_item
  n = valid.shape[0]
  valid_slots = jnp.nonzero(valid, size=n, fill_value=n - 1)[0].astype(jnp.int32)
  slot = valid_slots[jnp.clip(item, 0, n - 1)]
  return jnp.where(is_ph, base + slot * tokens_per_item + within, -1).astype(jnp.int32)


class MultimodalModel(nnx.Module):
  """batch (DESIGN.md keys) -> logits float32[B, T, V]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    impl = cfg.attention
    self.towers = nnx.Dict({"image": VisionTower(cfg.vision, attention_impl=impl,
                                                 remat=cfg.remat, **kw)})
    self.projectors = nnx.Dict({"image": Projector(cfg.projector, cfg.vision.width,
                                                   cfg.decoder.width, **kw)})
    self.decoder = Decoder(cfg.decoder, attention_impl=impl, remat=cfg.remat, **kw)
    self.modalities = (Modality("image", cfg.image_token_id, "images", "image_valid",
                                cfg.vision.tokens_per_image),)
    self.merge_impl = cfg.merge

  def embed_media(self, modality: Modality, items: jax.Array) -> jax.Array:
    """items -> float[M_m * P_m, D] projected rows, item-major."""
    with jax.named_scope(f"{modality.name}_tower"):
      features = self.towers[modality.name](items)
    rows = self.projectors[modality.name](features)
    return rows.reshape(-1, rows.shape[-1])

  def embed(self, batch: dict[str, jax.Array]) -> jax.Array:
    """The merged input stream float[B, T, D]."""
    tokens = batch["tokens"]
    text = self.decoder.embed(tokens)
    present = [m for m in self.modalities if m.items_key in batch]
    if not present:
      return text
    rows = [self.embed_media(m, batch[m.items_key]) for m in present]
    valids = [batch[m.valid_key] for m in present]
    return self._merge(present, tokens, text, rows, valids)

  def _merge(self, present, tokens, text, rows, valids):
    """One merge_tokens call over every modality's rows.

    Under a multi-device mesh the Pallas kernel runs per shard (XLA cannot partition a
    Pallas call): each shard holds whole rows with their own media slots, so numbering
    placeholders within the shard picks the same rows as the batch-wide walk.
    """
    def local(tokens, text, *media):
      index, base = jnp.full(tokens.shape, -1, jnp.int32), 0
      for m, r, valid in zip(present, media[:len(present)], media[len(present):], strict=True):
        index = jnp.maximum(index, media_index(tokens, m.token_id, valid, m.tokens_per_item,
                                               base))
        base += r.shape[0]
      return merge_tokens(text, jnp.concatenate(media[:len(present)], 0), index,
                          impl=self.merge_impl)

    mesh = jax.sharding.get_abstract_mesh()
    if self.merge_impl != "pallas" or mesh.empty or mesh.size == 1:
      return local(tokens, text, *rows, *valids)
    batch = sharding.spec_for(("act_batch",), tokens.shape[:1], mesh)[0]
    specs = ((P(batch, None), P(batch, None, None)) + (P(batch, None),) * len(rows)
             + (P(batch),) * len(valids))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(batch, None, None),
                         check_vma=False)(tokens, text, *rows, *valids)

  def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
    return self.decoder(self.embed(batch), batch["positions"], batch["segment_ids"])


def resolve_backends(cfg: ModelConfig) -> ModelConfig:
  """Replaces `auto` backends by concrete ones for this platform (validated early)."""
  merge = cfg.merge
  if merge == "auto":
    merge = "xla" if jax.default_backend() == "cpu" else "pallas"
  return dataclasses.replace(cfg, attention=attention.resolve(cfg.attention), merge=merge)
