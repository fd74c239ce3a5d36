"""The --dry_run memory table: parameters, optimizer state and activations per module.

Everything is global (the whole model and batch, before sharding: FSDP divides parameters,
gradients and optimizer state by its size, data parallelism the activations) and read off
the abstract train state, so it costs no memory:

- params, param bytes: the stored leaves (towers/<m>, projectors/<m>, decoder) as their
  dtype stores them: param_dtype, or a quantised kernel's packed ints plus its scales.
- trainable: parameters the optimizer updates; grad bytes = their bytes (same dtype).
- opt bytes: the optimizer state leaves (AdamW: mu and nu per trainable parameter, in the
  parameter's dtype), attributed by path; step counters go to the total only.
- act bytes: an estimate of the activations the backward pass keeps for one micro-batch
  (train.batch_size / optim.grad_accum rows), in the compute dtype (itemsize s). For a
  stack of L transformer blocks over n items of t tokens, width D, N heads, one block
  keeps, after Korthikanti et al. 2022 ("Reducing Activation Recomputation", eq. 1, which
  counts 2-byte values with an MLP of 4D),
      A = (34 n t D + 5 N n t^2 [only with attention=xla: flash kernels keep no scores]) s/2;
  model.remat none keeps L A; full keeps the L block inputs (n t D s) plus one block's A
  while it is recomputed; dots also keeps the weight matmuls' outputs (q, k, v, o, the MLP
  projections: n t (2D + (N + 2K) H + F') s per block, F' = 2F for SwiGLU) plus one A.
  The decoder (n = rows, t = seq_len) adds float32 logits and their gradient, 8 n t V,
  or 8 n c V for chunks of c = train.loss_chunk positions (train/losses.py).
  A tower runs backward only when it trains; its projector when it or its tower trains;
  the decoder always (the loss is behind it). The tower counts all of its blocks.
- peak estimate: param bytes + grad bytes + opt bytes + act bytes.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mm_jax.config import Config
from mm_jax.models import quant

GiB = 2**30


@dataclasses.dataclass
class Row:
  params: int = 0
  param_bytes: int = 0
  trainable: int = 0
  grad_bytes: int = 0
  opt_bytes: int = 0
  act_bytes: int = 0

  @property
  def peak_bytes(self) -> int:
    return self.param_bytes + self.grad_bytes + self.opt_bytes + self.act_bytes


def module_of(path) -> str | None:
  """A pytree path -> towers/<m>, projectors/<m>, decoder, or None (e.g. Adam's count)."""
  keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
  if not keys:
    return None
  return "decoder" if keys[0] == "decoder" else "/".join(keys[:2])


def _leaves(tree):
  """(module, parameters, bytes) per stored leaf; a quantised kernel's codes count the
  parameters they hold, its scales bytes only (mm_jax.models.quant.stored_params)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      size = int(np.prod(leaf.shape))
      names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
      n = quant.stored_params(names[-1], size) if names else size
      yield module_of(path), n, size * np.dtype(leaf.dtype).itemsize


def table(cfg: Config, abstract) -> dict[str, Row]:
  """Module -> Row (modules in order towers, projectors, decoder), then "total"."""
  rows: dict[str, Row] = {}
  total = Row()
  for trainable, tree in ((True, abstract.params), (False, abstract.frozen)):
    for module, n, nbytes in _leaves(tree):
      row = rows.setdefault(module, Row())
      for r in (row, total):
        r.params += n
        r.param_bytes += nbytes
        if trainable:
          r.trainable += n
          r.grad_bytes += nbytes
  for module, _, nbytes in _leaves(abstract.opt_state):
    if module in rows:
      rows[module].opt_bytes += nbytes
    total.opt_bytes += nbytes
  trains = {m for m, r in rows.items() if r.trainable}
  for module, nbytes in activation_bytes(cfg, trains).items():
    if module in rows:
      rows[module].act_bytes += nbytes
      total.act_bytes += nbytes
  kinds = ("towers", "projectors", "decoder")
  order = lambda m: (kinds.index(m.split("/")[0]) if m.split("/")[0] in kinds else 3, m)
  return {**{m: rows[m] for m in sorted(rows, key=order)}, "total": total}


def block_bytes(cfg: Config, n: int, t: int, d: int, heads: int, kv_heads: int, head: int,
                mlp: int, depth: int) -> int:
  """Activations kept for the backward pass by `depth` blocks over n items of t tokens."""
  s = np.dtype(cfg.model.dtype).itemsize
  scores = 5 * heads * n * t * t if cfg.model.attention == "xla" else 0
  one = (34 * n * t * d + scores) * s // 2
  if cfg.model.remat == "none":
    return depth * one
  kept = n * t * d * s
  if cfg.model.remat == "dots":
    kept += n * t * (2 * d + (heads + 2 * kv_heads) * head + mlp) * s
  return depth * kept + one


def activation_bytes(cfg: Config, trainable: set[str]) -> dict[str, int]:
  """Module -> estimated activation bytes for one micro-batch (see the module docstring)."""
  m, data = cfg.model, cfg.data
  rows = cfg.train.batch_size // cfg.optim.grad_accum
  out = {}
  v = m.vision
  vit_tokens = v.num_patches + (v.kind == "clip")
  vit_items = {"image": rows * data.images_per_sample if "image" in m.modalities else 0}
  if "video" in m.modalities:
    tower = "image" if m.video.tower == "shared" else "video"
    frames = rows * data.videos_per_sample * m.video.num_frames
    vit_items[tower] = vit_items.get(tower, 0) + frames
  vit = (v.width, v.heads, v.heads, v.width // v.heads, v.mlp_dim, v.depth)
  towers = {k: (n, vit_tokens, *vit) for k, n in vit_items.items() if n}
  if "audio" in m.modalities:
    a = m.audio
    towers["audio"] = (rows * data.audios_per_sample, (data.audio_seq_len + 1) // 2, a.width,
                       a.heads, a.heads, a.width // a.heads, a.mlp_dim, a.depth)
  s = np.dtype(m.dtype).itemsize
  for k, (n, t, d, *rest) in towers.items():
    tower_trains = f"towers/{k}" in trainable
    if tower_trains:
      out[f"towers/{k}"] = block_bytes(cfg, n, t, d, *rest)
    if tower_trains or f"projectors/{k}" in trainable:  # input, hidden and output rows
      out[f"projectors/{k}"] = n * t * (d + 2 * m.decoder.width) * s
  dec = m.decoder
  t = data.seq_len
  ffn = dec.mlp_dim * (2 if dec.mlp == "swiglu" else 1)
  chunk = min(t, cfg.train.loss_chunk or t)
  if trainable:
    out["decoder"] = (block_bytes(cfg, rows, t, dec.width, dec.heads, dec.kv_heads,
                                  dec.head_size, ffn, dec.depth)
                      + 8 * rows * chunk * dec.vocab_size)
  return out


def _size(nbytes: int) -> str:
  return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def format_table(cfg: Config, rows: dict[str, Row]) -> list[str]:
  """The printed table: one line per module, then the total and the peak estimate."""
  micro = cfg.train.batch_size // cfg.optim.grad_accum
  head = (f"memory (global, before sharding): micro-batch {micro} x {cfg.data.seq_len} tokens, "
          f"param_dtype={cfg.model.param_dtype}, dtype={cfg.model.dtype}, "
          f"remat={cfg.model.remat}, attention={cfg.model.attention}")
  cols = (f"{'module':16s} {'params':>15s} {'param bytes':>11s} {'trainable':>15s} "
          f"{'grad bytes':>11s} {'opt bytes':>11s} {'act bytes':>11s}")
  lines = [head, cols]
  for name, r in rows.items():
    lines.append(f"{name:16s} {r.params:>15,d} {_size(r.param_bytes):>11s} {r.trainable:>15,d} "
                 f"{_size(r.grad_bytes):>11s} {_size(r.opt_bytes):>11s} "
                 f"{_size(r.act_bytes):>11s}")
  lines.append(f"peak estimate (params + grads + optimizer + activations): "
               f"{_size(rows['total'].peak_bytes)}")
  return lines
