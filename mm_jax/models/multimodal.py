"""MultimodalModel: per-modality tower + projector, one merge, one decoder.

A modality (image, video, audio) is a tower, a projector, a placeholder token id and batch
keys. Its items are encoded to projected rows float[R_m, D] with a validity mask bool[R_m]
(invalid items; audio padding frames); all modalities' rows are concatenated and merged in
one `merge_tokens` call by DESIGN.md's rule: the k-th placeholder of modality m in a
row-major walk over `tokens` takes the k-th valid row of modality m. The decoder never
knows which rows came from media, so any mix of modalities (or none) shares one path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mm_jax import sharding, target
from mm_jax.config import ConfigError, ModelConfig
from mm_jax.kernels import choice
from mm_jax.kernels.merge import merge_tokens
from mm_jax.models.audio import AudioTower
from mm_jax.models.audio_projector import AudioProjector
from mm_jax.models.decoder import Decoder
from mm_jax.models.projector import Projector
from mm_jax.models.timecode import TimeCode
from mm_jax.models.vit import VisionTower


@dataclasses.dataclass(frozen=True)
class Modality:
  name: str  # "image" | "video" | "audio"
  token_id: int  # placeholder id in `tokens`
  items_key: str  # batch key of the items, e.g. "images"
  valid_key: str  # batch key of bool[M_m], e.g. "image_valid"


MODALITY_KEYS = {"image": ("images", "image_valid"), "video": ("video", "video_valid"),
                 "audio": ("audio", "audio_valid")}


def media_index(tokens: jax.Array, token_id: int, row_valid: jax.Array, base: int
                ) -> jax.Array:
  """int32[B, T]: row of the merged media table for each placeholder, -1 elsewhere.

  The k-th placeholder (row-major walk over `tokens`) takes the k-th *valid* row of this
  modality's rows, numbered from `base`. E.g. 2 rows per item, items valid [T, F, T]
  (row_valid [T, T, F, F, T, T]) and one row `a <i> <i> b <i> <i>`: the first two
  placeholders take rows base+0, base+1, the next two skip the invalid item and take
  base+4, base+5. Audio clips of different lengths mark their padding rows invalid.
  """
  is_ph = tokens == token_id
  k = jnp.cumsum(is_ph.reshape(-1).astype(jnp.int32)).reshape(tokens.shape) - 1
  n = row_valid.shape[0]
  valid_rows = jnp.nonzero(row_valid, size=n, fill_value=n - 1)[0].astype(jnp.int32)
  return jnp.where(is_ph, base + valid_rows[jnp.clip(k, 0, n - 1)], -1).astype(jnp.int32)


def pool_grid(x: jax.Array, stride: int) -> jax.Array:
  """Average pooling of a square patch grid: float[N, g*g, D] -> float[N, (g/s)^2, D]."""
  if stride == 1:
    return x
  n, p, d = x.shape
  g = int(round(p ** 0.5))
  grid = x.reshape(n, g // stride, stride, g // stride, stride, d).astype(jnp.float32)
  return grid.mean(axis=(2, 4)).reshape(n, -1, d).astype(x.dtype)


class MultimodalModel(nnx.Module):
  """batch (DESIGN.md keys) -> logits float32[B, T, V].

  Towers: `image` (also the video frames' tower when video.tower=shared), `video`
  (separate), `audio`. Projectors likewise, per modality unless video.projector=shared.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    impl, d = cfg.attention, cfg.decoder.width
    mods = cfg.modalities
    self.video_tower = "image" if cfg.video.tower == "shared" else "video"
    self.video_projector = "image" if cfg.video.projector == "shared" else "video"
    towers, projectors = {}, {}
    stacks = dict(attention_impl=impl, remat=cfg.remat, scan=cfg.scan_layers)
    vit = lambda: VisionTower(cfg.vision, **stacks, **kw)
    vision_projector = lambda: Projector(cfg.projector, cfg.vision.width, d, **kw)
    if "image" in mods or ("video" in mods and self.video_tower == "image"):
      towers["image"] = vit()
    if "image" in mods or ("video" in mods and self.video_projector == "image"):
      projectors["image"] = vision_projector()
    if "video" in mods and self.video_tower == "video":
      towers["video"] = vit()
    if "video" in mods and self.video_projector == "video":
      projectors["video"] = vision_projector()
    if "audio" in mods:
      towers["audio"] = AudioTower(cfg.audio, **stacks, **kw)
      projectors["audio"] = AudioProjector(cfg.audio, d, **kw)
    self.towers, self.projectors = nnx.Dict(towers), nnx.Dict(projectors)
    self.decoder = Decoder(cfg.decoder, **stacks, **kw)
    self.time_code = (TimeCode(cfg.video.num_frames, d, rngs=rngs, param_dtype=param_dtype)
                      if cfg.time_code == "learned" else None)
    self.modalities = tuple(Modality(m, cfg.token_id(m), *MODALITY_KEYS[m]) for m in mods)
    self.video_pool = cfg.video.pool
    self.merge_impl = cfg.merge

  def embed_media(self, modality: Modality, batch: dict[str, jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
    """A modality's items -> (float[R, D] projected rows in item order, bool[R] valid)."""
    items, valid = batch[modality.items_key], batch[modality.valid_key]
    with jax.named_scope(f"{modality.name}_tower"):
      if modality.name == "image":
        rows = self.projectors["image"](self.towers["image"](items))  # [M, P, D]
      elif modality.name == "video":  # [Mv, F, S, S, 3]: frames through the ViT
        frames = items.reshape((-1,) + items.shape[2:])
        features = pool_grid(self.towers[self.video_tower](frames), self.video_pool)
        rows = self.projectors[self.video_projector](features)
        rows = rows.reshape(items.shape[0], -1, rows.shape[-1])  # [Mv, F * P', D]
        if self.time_code is not None:
          rows = self.time_code.video(rows, items.shape[1])
      else:  # audio: [Ma, L, n_mels] and each clip's frame count
        frames = jnp.arange(items.shape[1])[None, :] < batch["audio_frames"][:, None]
        x, out_valid = self.towers["audio"](items, frames & valid[:, None])
        rows = self.projectors["audio"](x)
        if self.time_code is not None:
          rows = self.time_code.audio(rows, out_valid)
        return rows.reshape(-1, rows.shape[-1]), out_valid.reshape(-1)
    row_valid = jnp.repeat(valid, rows.shape[1])
    return rows.reshape(-1, rows.shape[-1]), row_valid

  def embed(self, batch: dict[str, jax.Array]) -> jax.Array:
    """The merged input stream float[B, T, D]."""
    tokens = batch["tokens"]
    text = self.decoder.embed(tokens)
    present = [m for m in self.modalities if m.items_key in batch]
    if not present:
      return text
    media = [self.embed_media(m, batch) for m in present]
    return self._merge(present, tokens, text, [r for r, _ in media], [v for _, v in media])

  def _merge(self, present, tokens, text, rows, valids):
    """One merge_tokens call over every modality's rows.

    Under a multi-device mesh the Pallas kernel runs per shard (XLA cannot partition a
    Pallas call): each shard holds whole rows with their own media items, so numbering
    placeholders within the shard picks the same rows as the batch-wide walk.
    """
    def local(tokens, text, *media):
      index, base = jnp.full(tokens.shape, -1, jnp.int32), 0
      for m, r, valid in zip(present, media[:len(present)], media[len(present):], strict=True):
        index = jnp.maximum(index, media_index(tokens, m.token_id, valid, base))
        base += r.shape[0]
      table = jnp.concatenate([r.astype(text.dtype) for r in media[:len(present)]], 0)
      return merge_tokens(text, table, index, impl=self.merge_impl)

    mesh = jax.sharding.get_abstract_mesh()
    if self.merge_impl != "pallas" or mesh.empty or mesh.size == 1:
      return local(tokens, text, *rows, *valids)
    batch = sharding.spec_for(("act_batch",), tokens.shape[:1], mesh)[0]
    specs = ((P(batch, None), P(batch, None, None)) + (P(batch, None),) * len(rows)
             + (P(batch),) * len(valids))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(batch, None, None),
                         check_vma=False)(tokens, text, *rows, *valids)

  def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
    """The batch -> logits float32[B, T, V]."""
    return self.decoder(self.embed(batch), batch["positions"], batch["segment_ids"])

  def hidden(self, batch: dict[str, jax.Array]) -> jax.Array:
    """The batch -> the decoder's final hidden states float[B, T, D] (before its head)."""
    return self.decoder.hidden(self.embed(batch), batch["positions"], batch["segment_ids"])


def resolve_backends(cfg: ModelConfig, tgt: target.Target | None = None) -> ModelConfig:
  """Replaces `auto` backends by the ones kernels/choice.py picks for the compile target
  (`tgt`, else target.current()); cudnn off a GPU is an error naming the key."""
  tgt = tgt or target.current()
  attention_impl, merge = cfg.attention, cfg.merge
  if attention_impl == "auto":
    heads = (cfg.decoder.head_size,) + tuple(
        t.width // t.heads for name, t in (("image", cfg.vision), ("video", cfg.vision),
                                           ("audio", cfg.audio)) if name in cfg.modalities)
    picked = choice.attention(tgt, cfg.dtype, heads)
    choice.log("model.attention", tgt, picked)
    attention_impl = picked.impl
  if attention_impl == "cudnn" and tgt.platform != "gpu":
    raise ConfigError(f"config.model.attention: cudnn needs a GPU target, this is {tgt.name}")
  if merge == "auto":
    picked = choice.merge(tgt)
    choice.log("model.merge", tgt, picked)
    merge = picked.impl
  return dataclasses.replace(cfg, attention=attention_impl, merge=merge)
