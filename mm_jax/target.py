"""The compile target: the machine a step is compiled for, as a value.

It comes from the mesh's devices: the local ones, or a TPU or GPU topology when compiling for
hardware that is not here (mm_jax/aot.py). Every platform-dependent choice reads it, never
the host's default backend: the kernel backend, interpret or compile, block sizes, what `auto`
picks (mm_jax/kernels/choice.py), the QLoRA dequantisation order, peak FLOPs for MFU.

`current()` answers inside traced code too: a target set with `use`, else the device kind of
the mesh set by `jax.set_mesh` (as the train step and the dry run set it), else the local devices.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence

import jax

from mm_jax import accelerators


@dataclasses.dataclass(frozen=True)
class Target:
  """platform: "cpu" | "gpu" | "tpu"; device_kind as jax spells it; capability: CUDA's."""

  platform: str
  device_kind: str
  capability: tuple[int, int] | None = None

  @property
  def interpret(self) -> bool:
    """Pallas kernels run in the interpreter only on CPU."""
    return self.platform == "cpu"

  @property
  def chip(self) -> accelerators.Chip | None:
    return accelerators.chip_of(self.device_kind) if self.platform != "cpu" else None

  @property
  def peak_flops(self) -> float | None:
    """Dense bf16 peak FLOP/s per device; None where unknown (CPU)."""
    return self.chip.peak_bf16_flops if self.chip else None

  @property
  def hbm_bytes(self) -> int | None:
    return self.chip.hbm_bytes if self.chip else None

  @property
  def name(self) -> str:
    chip = self.chip
    if chip is None:
      return self.platform
    return f"{chip.name}" + (f" (sm_{self.capability[0]}{self.capability[1]})"
                             if self.capability else "")

  @classmethod
  def of_device(cls, device) -> Target:
    """A jax Device, or a mesh's AbstractDevice (no compute capability: the chip table's)."""
    platform = "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform
    return cls(platform, device.device_kind, _capability(device, platform))

  @classmethod
  def of_mesh(cls, mesh: jax.sharding.Mesh) -> Target:
    return cls.of_device(mesh.devices.flat[0])


def _capability(device, platform: str) -> tuple[int, int] | None:
  if platform != "gpu":
    return None
  cap = getattr(device, "compute_capability", None)
  if cap:
    major, minor = str(cap).split(".")[:2]
    return int(major), int(minor)
  chip = accelerators.chip_of(device.device_kind)
  return chip.capability if chip else None


_ACTIVE: contextvars.ContextVar[Target | None] = contextvars.ContextVar("target", default=None)


@contextlib.contextmanager
def use(target: Target) -> Iterator[Target]:
  """Makes `target` what `current()` returns inside the block (tests, kernel compiles)."""
  token = _ACTIVE.set(target)
  try:
    yield target
  finally:
    _ACTIVE.reset(token)


def current() -> Target:
  """The target of the code being traced: `use`, else the set mesh's devices, else local."""
  active = _ACTIVE.get()
  if active is not None:
    return active
  abstract = jax.sharding.get_abstract_mesh()
  if not abstract.empty and abstract.abstract_device is not None:
    dev = abstract.abstract_device
    mine = jax.local_devices()[0]
    # The same chip as here: its own compute capability; else the chip table's.
    same = dev.platform == mine.platform and dev.device_kind == mine.device_kind
    return Target.of_device(mine if same else dev)
  return local()


def local(devices: Sequence[jax.Device] | None = None) -> Target:
  """The target of this host's devices."""
  return Target.of_device((devices or jax.local_devices())[0])
