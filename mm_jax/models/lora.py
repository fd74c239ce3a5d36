"""LoRA (Hu et al. 2021): low-rank adapters on the Dense layers whose module path matches.

Applied after the model is built, so the base weights are exactly those of the same model
without adapters (same seed, same draws), and models never need to know their own path.
The adapters are `nnx.LoRAParam`s; `mm_jax.train.state` keeps them trainable whatever
`optim.freeze` says, so a stage freezes the base with plain patterns (r"^decoder/").

We do not use qwix (0.1.8): it carries only `out_sharding`/`sharding_names` metadata over
to the adapters (ours is `logical_axes`, copied unchanged onto a tensor of another rank),
flattens multi-dim kernels (q's B would be [R, N*H], losing the "heads" axis), and creates
adapters by tracing a call with sample inputs, which `state.build`'s abstract
eval_shape / jit(out_shardings) initialisation does not have.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.config import ConfigError, LoraConfig
from mm_jax.models import quant, stack
from mm_jax.models.layers import Dense


def module_path(path) -> str:
  """('decoder', 'layers', 3, 'q') -> 'decoder/layers/3/q'."""
  return "/".join(str(k) for k in path)


def apply(model: nnx.Module, cfg: LoraConfig, seed: int) -> nnx.Module:
  """Adds adapters in place to every Dense matching `cfg.targets`; returns `model`.

  Raises ConfigError if rank > 0 and no module matches (a typo would silently train
  nothing but the explicitly trainable modules).
  """
  if cfg.rank == 0:
    return model
  patterns = [re.compile(t) for t in cfg.targets]
  # A stream of its own: the adapters' draws never shift the base weights' draws.
  rngs = nnx.Rngs(params=seed + 0x10A)
  hits = []

  def adapt(path, m):  # layer paths: a scanned stack's layers one by one, as unrolled
    if not (isinstance(m, Dense) and any(p.search(module_path(path)) for p in patterns)):
      return
    hits.append(path)
    m.add_lora(cfg.rank, cfg.alpha, rngs, cfg.dropout)
    if cfg.base_qtype != "none":
      try:
        m.quantize_base(cfg.base_qtype, cfg.block_size, module_path(path))
      except ValueError as e:
        raise ConfigError(f"config.lora.block_size: {e}") from e

  try:
    stack.surgery(model, adapt)
  except ValueError as e:  # some layers of a stack adapted, others not
    raise ConfigError(f"config.lora.targets: {cfg.targets} adapt only some layers of a "
                      f"scanned stack ({e}); match all of them, or set "
                      "config.model.scan_layers=False") from None
  if not hits:
    raise ConfigError(f"config.lora.targets: {cfg.targets} match no Dense module")
  return model


def set_dropout_keys(model: nnx.Module, key: jax.Array) -> None:
  """Gives every adapter with dropout its own key (fold_in of `key` and its index), which
  turns the dropout on for the next call; the train step calls this on its merged model.
  Adapters are numbered in the order of their layer paths (sorted), so a scanned stack's
  layer i gets the key its unrolled twin does; a stacked Dense gets its L keys stacked."""
  found = [(tuple(p), m) for p, m in nnx.iter_modules(model)
           if isinstance(m, Dense) and m.lora_a is not None and m.lora_dropout]
  layers = {p: [p] if stack.split_path(p + ("kernel",)) is None else
            [q[:-1] for q in stack.layer_paths(p + ("kernel",), m.lora_a.shape[0])]
            for p, m in found}
  order = sorted((tuple((isinstance(k, str), k) for k in q), q)
                 for qs in layers.values() for q in qs)
  index = {q: i for i, (_, q) in enumerate(order)}
  for p, m in found:
    keys = [jax.random.fold_in(key, index[q]) for q in layers[p]]
    m.lora_key = jnp.stack(keys) if layers[p] != [p] else keys[0]


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel in place (W += (alpha / r) A.B) and removes it:
  the plain model, e.g. for export to frameworks without LoRA. A quantised base kernel is
  dequantised first (float32), so the result is an ordinary float model. Returns `model`."""
  stack.surgery(model, lambda _, m: _merge(m) if isinstance(m, Dense) else None)
  return model


def _merge(m: Dense) -> None:
  if m.qtype is not None:
    kernel = quant.dequantize(getattr(m, quant.code_name(m.qtype))[...],
                              m.kernel_scale[...], m.n_in, m.in_shape, m.qtype, jnp.float32)
    delattr(m, quant.code_name(m.qtype))
    del m.kernel_scale
    m.kernel = nnx.Param(kernel, logical_axes=m.axes)
    m.qtype = None
  if m.lora_a is not None:
    delta = jnp.tensordot(m.lora_a[...], m.lora_b[...], axes=1)  # [*in, R].[R, *out]
    m.kernel[...] = m.kernel[...] + (m.lora_scale * delta).astype(m.kernel.dtype)
    m.lora_a = m.lora_b = None
    m.lora_scale = 0.0
