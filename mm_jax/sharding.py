"""Device mesh and the ONE table that maps logical axis names to mesh axes.

Parameters carry `logical_axes` metadata from their constructors (mm_jax/models);
activations are constrained at block boundaries with `constrain`. Nothing else in the
code base names a mesh axis.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mm_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). Grouped by subsystem.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Activations: the batch is split over every data-parallel axis.
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
    # The stacked dim of a scanned layer stack (models/stack.py): every device holds every
    # layer's slice of a parameter, as it holds every layer of an unrolled model.
    ("layers", None),
    # Decoder parameters: FSDP over the model width, Megatron-style tensor parallelism
    # over heads and MLP width (column-parallel in, row-parallel out).
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    # Vision / audio towers: same scheme on their own widths.
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("audio_embed", "fsdp"),
    ("audio_heads", "tensor"),
    ("audio_mlp", "tensor"),
)
_RULES = dict(RULES)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Mesh with axes (data, fsdp, tensor); a -1 size takes the remaining devices.

  `devices`: the local ones by default, or a TPU/GPU topology's (mm_jax/aot.py). Devices of
  several TPU slices (multislice) get a hybrid mesh: `data` spans the slices over the
  data-centre network, everything else stays inside a slice on its ICI links.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = list(cfg.shape)
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ConfigError(f"config.mesh: {len(devices)} devices not divisible by {known} "
                        f"(the sizes other than -1 in {tuple(cfg.shape)})")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ConfigError(f"config.mesh: shape {tuple(shape)} needs {int(np.prod(shape))} "
                      f"devices, have {len(devices)}; set one size to -1 to take the rest")
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    if shape[0] % slices:
      raise ConfigError(f"config.mesh.data: {shape[0]} is not a multiple of the {slices} "
                        "slices (multislice runs data parallelism across slices)")
    grid = mesh_utils.create_hybrid_device_mesh(
        (shape[0] // slices, *shape[1:]), (slices, 1, 1), devices,
        allow_split_physical_axes=True)
  else:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def spec_for(axes: Sequence[str | None], shape: Sequence[int],
             mesh: jax.sharding.Mesh) -> PartitionSpec:
  """PartitionSpec for a value with logical `axes`.

  A dimension whose size the mesh axes do not divide stays replicated (logged once per
  name): e.g. 4 kv heads on tensor=8. A mesh axis is used at most once per value.
  """
  used, out = set(), []
  for name, size in zip(axes, shape, strict=True):
    mesh_axes = _RULES.get(name) if name is not None else None
    if name is not None and name not in _RULES:
      raise KeyError(f"logical axis {name!r} missing from mm_jax.sharding.RULES")
    if isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    mesh_axes = tuple(a for a in (mesh_axes or ()) if a not in used and mesh.shape[a] > 1)
    n = int(np.prod([mesh.shape[a] for a in mesh_axes]))
    if mesh_axes and size % n:
      _warn_once(name, size, n)
      mesh_axes = ()
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return PartitionSpec(*out)


_WARNED: set[tuple] = set()


def _warn_once(name, size, n):
  if (name, size, n) not in _WARNED:
    _WARNED.add((name, size, n))
    logging.warning("sharding: %s of size %d not divisible by %d devices; replicated",
                    name, size, n)


def state_shardings(abstract, mesh: jax.sharding.Mesh):
  """NamedShardings for a state pytree: nnx Variables by their `logical_axes`, everything
  else (step counters, Adam's count) replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  def one(x):
    if isinstance(x, nnx.Variable):
      axes = x.get_metadata().get("logical_axes") or (None,) * len(x.shape)
      return x.replace(NamedSharding(mesh, spec_for(axes, x.shape, mesh)))
    return replicated
  return jax.tree.map(one, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(_RULES["act_batch"], *([None] * (ndim - 1))))


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
  """with_sharding_constraint by logical names, under the mesh set by `jax.set_mesh`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh))
