"""Optimizer: AdamW with warmup + cosine decay and global-norm clipping; freezing by regex.

Frozen parameters are split out of the trainable state before the optimizer sees them,
so they get neither gradients nor optimizer state (Adam moments would double memory).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax

from mm_jax.config import OptimConfig
from mm_jax.models import stack


def path_str(path: Sequence) -> str:
  """('decoder', 'layers', 3, 'up', 'kernel') -> 'decoder/layers/3/up/kernel'."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def frozen_filter(patterns: Sequence[str]):
  """nnx filter: true for parameters whose path matches any freeze regex. Patterns see
  layer paths ("decoder/layers/3/up/kernel") in either layout: a scanned stack's
  parameter is frozen when every layer's path matches (models/stack.py)."""
  compiled = [re.compile(p) for p in patterns]
  return stack.layer_filter(lambda path: any(c.search(path) for c in compiled),
                            "config.optim.freeze", path_str)


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  if cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                 optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_tx(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """clip -> AdamW; weight decay only on Dense/conv kernels.

  Chosen by name, not rank: norms, biases (q/k/v biases are [N, H]), embeddings and
  position tables are never decayed.
  """
  # Pytree paths end in the Variable's `.value` attribute: look at the last dict key.
  name = lambda path: [k.key for k in path if hasattr(k, "key")][-1]
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: name(path) == "kernel", params)
  adamw = optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
  return adamw
