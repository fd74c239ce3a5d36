"""The frozen base of a LoRA run: quantising it, fingerprinting it, rebuilding it on resume.

A LoRA (or QLoRA) checkpoint holds what trains (adapters, trainable modules, optimizer,
data position) and a fingerprint of the frozen base, not the base itself: the base is
re-read from its source (the `config.init` folders, or the seed for random parameters),
and a base whose fingerprint differs from the checkpoint's is refused.

The fingerprint is exact and layout-free: per leaf, two sums over all elements of
(bits x odd multiplier of the flat index) in uint32 arithmetic, which wraps, so the sums
are the same in any order, on any mesh; then sha256 over (path, dtype, shape, sums).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.config import Config, ConfigError
from mm_jax.models import quant, stack


def saves_base(cfg: Config) -> bool:
  """Whether checkpoints leave the frozen base out (LoRA runs)."""
  return cfg.lora.rank > 0


def source(cfg: Config) -> dict:
  """Where the base comes from, for messages and the checkpoint's record."""
  folders = {k: v for k, v in dataclasses.asdict(cfg.init).items() if v}
  return {"init": folders, "seed": cfg.train.seed, "base_qtype": cfg.lora.base_qtype,
          "block_size": cfg.lora.block_size}


def _leaf_sums(x: jax.Array) -> jax.Array:
  """uint32[2]: order-free sums of the leaf's bits weighted by its flat index."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  flat, stride = jnp.zeros(bits.shape, jnp.uint32), 1
  for d in range(bits.ndim - 1, -1, -1):  # row-major flat index, wrapping like the sums
    flat = flat + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride)
    stride = (stride * bits.shape[d]) % 2**32
  h1 = (bits * (flat * jnp.uint32(2654435761) + jnp.uint32(1))).sum(dtype=jnp.uint32)
  h2 = ((bits ^ jnp.uint32(0x5BD1E995)) * (flat * jnp.uint32(40503) + jnp.uint32(97))).sum(
      dtype=jnp.uint32)
  return jnp.stack([h1, h2])


def fingerprint(frozen: nnx.State) -> str:
  """Hex digest of every stored base parameter (Params and quantised kernels)."""
  leaves = [("/".join(str(p) for p in path), var[...])
            for path, var in nnx.to_flat_state(frozen)
            if isinstance(var, (nnx.Param, quant.QuantKernel))]
  # One program for all leaves: one compile, not one per distinct shape.
  sums = jax.device_get(jax.jit(lambda xs: [_leaf_sums(x) for x in xs])([x for _, x in leaves]))
  digest = hashlib.sha256()
  for (name, value), (h1, h2) in zip(leaves, np.asarray(sums).reshape(-1, 2), strict=True):
    digest.update(f"{name}|{value.dtype}|{value.shape}|{h1}|{h2};".encode())
  return digest.hexdigest()[:20]


def check(saved: dict, frozen: nnx.State, cfg: Config, where: str) -> None:
  """Raises ConfigError if the rebuilt base is not the one the checkpoint trained on."""
  got = fingerprint(frozen)
  if saved.get("fingerprint") != got:
    raise ConfigError(
        f"config.init: {where} was trained on a different frozen base (fingerprint "
        f"{saved.get('fingerprint')} from {saved.get('source')}); this config gives "
        f"{got} from {source(cfg)}. Point config.init / train.seed / config.lora at the "
        "original base, or start in a new workdir")


def quantize_frozen(fp_frozen: nnx.State, abstract: nnx.State, shardings: nnx.State,
                    cfg: Config) -> nnx.State:
  """A float base (kernels unquantised, e.g. just read from HF) -> the quantised layout of
  `abstract`, one kernel at a time; each float kernel is freed once quantised, so the
  peak is the float base plus one layer's codes, never two whole bases."""
  fp = dict(nnx.to_flat_state(fp_frozen))
  sh = dict(nnx.to_flat_state(shardings))
  target = dict(nnx.to_flat_state(abstract))
  code = quant.code_name(cfg.lora.base_qtype)
  out = []
  for path, var in target.items():
    name, module = path[-1], path[:-1]
    if name == "kernel_scale":
      continue  # written with its codes
    if name != code:
      out.append((path, var.replace(fp[path][...])))
      continue
    kernel = fp[module + ("kernel",)][...]
    n_in = kernel.ndim - var.ndim + 1
    scale_path = module + ("kernel_scale",)
    fn = functools.partial(quant.quantize, n_in=n_in, qtype=cfg.lora.base_qtype,
                           block=cfg.lora.block_size)
    if stack.split_path(path) is not None:  # [L, ...] (n_in counts the same either way)
      fn = jax.vmap(fn)
    fn = jax.jit(fn, out_shardings=(sh[path].get_value(), sh[scale_path].get_value()))
    codes, scales = fn(kernel)
    kernel.delete()
    out.append((path, var.replace(codes)))
    out.append((scale_path, target[scale_path].replace(scales)))
  return nnx.from_flat_state(out)
