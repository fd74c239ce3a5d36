"""Scanned layer stacks: `model.scan_layers`.

A `Stack` holds `depth` copies of one block as a single block whose every Variable has a
leading [L] dim (logical axis "layers", never sharded), and runs them with one
`jax.lax.scan`: the compiler sees one block body whatever the depth, so compile time stays
flat in depth, and the remat policy applies to the scan body, so what lives between the
forward and backward passes is fixed by the program (one carry per layer plus the
policy's residuals) rather than by optimisation barriers a backend may strip.

Paths. A stacked Variable lives at `<stack>/scan/<rest>` with shape [L, ...]; the
*layer path* of its layer i is `<stack>/<i>/<rest>`, exactly the path the unrolled model
(an `nnx.List` of blocks) gives. Everything that speaks in per-layer paths (HF import and
export, PEFT, freeze and LoRA regexes) goes through `layer_paths` / `unstack_flat` /
`layer_index` / `layer_filter`, so it works on both layouts unchanged.

Construction-time surgery that changes a block's structure (LoRA adapters, quantising a
base kernel, merging adapters) runs on `unstack()`'s per-layer blocks, then `restack()`s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models import remat as remat_lib

BLOCK = "scan"  # the path key of a Stack's stacked block
AXIS = "layers"  # logical axis name of the stacked dim


class Stack(nnx.Module):
  """`depth` blocks from `make()` (called `depth` times, in order: the same parameter draws
  as an unrolled list), stacked."""

  def __init__(self, make: Callable[[], nnx.Module], depth: int):
    if depth < 1:
      raise ValueError(f"a Stack needs depth >= 1, got {depth}")
    self.depth = depth
    self.scan = _stack([make() for _ in range(depth)])

  def __len__(self) -> int:
    return self.depth

  def unstack(self) -> list[nnx.Module]:
    """The `depth` blocks as separate modules (copies of the slices)."""
    graphdef, state = nnx.split(self.scan)
    flat = nnx.to_flat_state(state)
    return [nnx.merge(graphdef, nnx.from_flat_state([(p, _layer(v, i)) for p, v in flat]))
            for i in range(self.depth)]

  def restack(self, blocks: list[nnx.Module]) -> None:
    """Replaces the stacked block by `blocks` (e.g. `unstack()`'s, after surgery)."""
    if len(blocks) != self.depth:
      raise ValueError(f"restack: {len(blocks)} blocks for a stack of {self.depth}")
    self.scan = _stack(blocks)

  def run(self, body: Callable, x: Any, *consts: Any, xs: Any = None, upto: int | None = None,
           remat: str = "none", collect: bool = False):
    """Runs `body(block_i, x, *consts[, xs_i]) -> x` (or `-> (x, y_i)` with `xs`) over
    layers [0, upto) under the remat policy.

    xs: a pytree with a leading [L] dim sliced per layer alongside the block (a KV cache).
    Returns x; (x, ys) with `xs`; with collect=True, (x, stacked carries [upto, ...]).
    """
    upto = self.depth if upto is None else upto
    graphdef, state = nnx.split(self.scan)
    if upto != self.depth:
      state = jax.tree.map(lambda a: a[:upto], state)

    def step(s, carry, *args):
      block = nnx.merge(graphdef, s)
      return body(block, carry, *args)

    step = _checkpoint(step, remat)

    def scan_body(carry, sliced):
      s, x_i = sliced
      if xs is None:
        out = step(s, carry, *consts)
        return out, (out if collect else None)
      out, y = step(s, carry, *consts, x_i)
      return out, y

    out, ys = jax.lax.scan(scan_body, x, (state, xs))
    return (out, ys) if (collect or xs is not None) else out


def _checkpoint(fn: Callable, remat: str) -> Callable:
  if remat == "none":
    return fn
  if remat not in remat_lib.POLICIES:
    raise ValueError(f"remat must be one of {remat_lib.REMAT}, got {remat!r}")
  # prevent_cse=False: inside a scan, jax's own guidance (the scan body already keeps the
  # recompute from being merged with the forward).
  return jax.checkpoint(fn, policy=remat_lib.POLICIES[remat], prevent_cse=False)


def _layer(var: Any, i: int) -> Any:
  """Layer i of a stacked Variable (or a stacked plain array), "layers" axis dropped."""
  if not isinstance(var, nnx.Variable):
    return var[i]
  axes = var.get_metadata().get("logical_axes")
  meta = {} if axes is None else {"logical_axes": tuple(axes[1:])}
  return var.replace(var.get_value()[i], **meta)


def _stack(blocks: list[nnx.Module]) -> nnx.Module:
  """One block whose Variables are the blocks' stacked on a leading "layers" dim."""
  graphdef, first = nnx.split(blocks[0])
  states = [first] + [nnx.split(b)[1] for b in blocks[1:]]
  for i, b in enumerate(blocks[1:], 1):
    if nnx.graphdef(b) != graphdef:
      raise ValueError(f"block {i} differs in structure from block 0; a Stack needs "
                       "identical blocks")
  flats = [dict(nnx.to_flat_state(s)) for s in states]
  new = []
  for path, var in flats[0].items():
    if not isinstance(var, nnx.Variable):  # a plain array attribute (a dropout key)
      new.append((path, jnp.stack([f[path] for f in flats])))
      continue
    value = jnp.stack([f[path].get_value() for f in flats])
    axes = var.get_metadata().get("logical_axes")
    meta = {} if axes is None else {"logical_axes": (AXIS, *axes)}
    new.append((path, var.replace(value, **meta)))
  return nnx.merge(graphdef, nnx.from_flat_state(new))


# ----------------------------------------------------------------------------- paths


def _key(k) -> Any:
  return getattr(k, "key", k)


def split_path(path: tuple) -> tuple[tuple, tuple] | None:
  """(stack path, rest) if `path` runs through a Stack's block, else None."""
  keys = tuple(_key(k) for k in path)
  for j in range(len(keys) - 1, -1, -1):
    if keys[j] == BLOCK:
      return keys[:j], keys[j + 1:]
  return None


def is_stacked(var: Any) -> bool:
  """Whether a Variable (or its ShapeDtypeStruct-valued twin) carries the stacked dim."""
  meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
  axes = meta.get("logical_axes") or ()
  return bool(axes) and axes[0] == AXIS


def layer_paths(path: tuple, depth: int) -> list[tuple]:
  """A stacked Variable's path -> the L layer paths it stands for (unrolled spelling)."""
  stack, rest = split_path(path)
  return [(*stack, i, *rest) for i in range(depth)]


def unstack_flat(flat: Mapping[tuple, Any]) -> dict[tuple, Any]:
  """{path: array} with stacked entries ([L, ...] at .../block/...) expanded into per-layer
  entries at their layer paths (numpy views, no copies); other entries unchanged."""
  out: dict[tuple, Any] = {}
  for path, x in flat.items():
    parts = split_path(path)
    if parts is None:
      out[path] = x
      continue
    for i, p in enumerate(layer_paths(path, np.shape(x)[0])):
      out[p] = x[i]
  return out


def layer_index(paths: Iterable[tuple[tuple, Any]]) -> dict[tuple, tuple[tuple, int]]:
  """{layer path: (stacked path, i)} for the stacked entries of (path, leaf) pairs (leaf:
  anything with a shape, [L, ...]); a model's per-layer spelling of its stacked leaves."""
  out = {}
  for path, leaf in paths:
    if split_path(path) is not None:
      for i, p in enumerate(layer_paths(path, int(np.shape(leaf)[0]))):
        out[p] = (path, i)
  return out


def layer_filter(match: Callable[[str], bool], where: str, path_str: Callable[[tuple], str]
                 ) -> Callable[[tuple, Any], bool]:
  """An nnx filter `(path, var) -> bool` that applies `match` to layer paths: a stacked
  Variable matches when all its layers do, and a pattern that picks some layers of a stack
  but not others is a ConfigError naming `where` (a stack trains or freezes as one)."""
  from mm_jax.config import ConfigError

  def filt(path, var) -> bool:
    if split_path(path) is None:
      return match(path_str(path))
    hits = [match(path_str(p)) for p in layer_paths(path, int(np.shape(var)[0]))]
    if all(hits) or not any(hits):
      return hits[0]
    stack, _ = split_path(path)
    raise ConfigError(f"{where}: picks layers {[i for i, h in enumerate(hits) if h]} of "
                      f"{path_str(stack)} but not the rest; its layers are one scanned stack "
                      "(set config.model.scan_layers=False to treat layers apart)")
  return filt


def _child(module: Any, key: Any) -> Any:
  return module[key] if isinstance(key, int) else getattr(module, key)


def stacks(model: nnx.Module) -> list[tuple[tuple, Stack]]:
  """(path, Stack) for every Stack of `model`."""
  return [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, Stack)]


def surgery(model: nnx.Module, fn: Callable[[tuple, nnx.Module], None]) -> None:
  """Calls fn(layer path, module) for every module of `model` in `nnx.iter_modules` order,
  each Stack's layers unstacked (at their layer paths, in layer order) and restacked after,
  so `fn` may change a block's structure as long as it changes every layer alike. Raises
  ValueError naming the stack when the layers come out different."""
  found = stacks(model)
  inside = lambda p: any(p[:len(s) + 1] == (*s, BLOCK) for s, _ in found)
  for path, module in list(nnx.iter_modules(model)):
    path = tuple(path)
    if inside(path):
      continue
    if not isinstance(module, Stack):
      fn(path, module)
      continue
    blocks = module.unstack()
    for i, block in enumerate(blocks):
      for sub, m in list(nnx.iter_modules(block)):
        fn((*path, i, *sub), m)
    try:
      module.restack(blocks)
    except ValueError as e:
      raise ValueError(f"{'/'.join(map(str, path))}: {e}") from None


def unroll(model: nnx.Module) -> nnx.Module:
  """Replaces every Stack of `model` in place by an nnx.List of its layers (copies): the
  unrolled model, with the unrolled paths. Returns `model`."""
  for path, s in stacks(model):
    parent = model
    for k in path[:-1]:
      parent = _child(parent, k)
    setattr(parent, path[-1], nnx.List(s.unstack()))
  return model


def layer_path_set(pairs: Iterable[tuple[tuple, Any]]) -> set[tuple]:
  """The layer paths of (path, leaf) pairs: stacked leaves stand for L paths each."""
  pairs = list(pairs)
  stacked = layer_index(pairs)
  return {tuple(p) for p, _ in pairs if split_path(p) is None} | set(stacked)
