"""Accelerator facts, one table for dry runs, kernels, metrics and launch/.

Standard library only: launch/ (whose XManager environment has no jax) reads the TPU slice
tables from here too. Figures are vendor data sheets: dense bf16 peak (no sparsity) and HBM
per chip. GPU rows also carry what XLA's GPU compiler needs to compile for the card without
one (a GpuTargetConfigProto: SM count, shared memory, compute capability, ...), after the
published specs of openxla/xla `xla/backends/gpu/target_config/specs/`.

Names, as launch/ spells them:
  TPU    v5e-N, v5p-N, v6e-N (v5p counts TensorCores, 2 per chip), with `slices`
  GPU    GKE machine types a3-highgpu-8g, a3-megagpu-8g, a3-ultragpu-8g, a2-ultragpu-8g,
         a4-highgpu-8g, with `nodes`; XManager's <gpu>x<per node>: h100x8, h200x8, a100x8, ...
"""

from __future__ import annotations

import dataclasses
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip (a TPU chip or a GPU)."""

  name: str  # short name: v5p, h100, ...
  platform: str  # "tpu" | "gpu"
  device_kinds: tuple[str, ...]  # how jax's Device.device_kind spells it (substrings)
  hbm_bytes: int
  peak_bf16_flops: float
  capability: tuple[int, int] | None = None  # CUDA compute capability
  gpu_info: tuple[tuple[str, object], ...] = ()  # GpuTargetConfigProto.gpu_device_info
  description: str = ""  # the device name XLA is told (GPU)

  @property
  def hbm_gib(self) -> float:
    return self.hbm_bytes / GiB


def _gpu_info(sms: int, smem_sm: int, smem_optin: int, fpus: int, l2: int, bandwidth: float,
              clock: float, hbm: int) -> tuple[tuple[str, object], ...]:
  return (("threads_per_block_limit", 1024), ("threads_per_warp", 32),
          ("shared_memory_per_block", 49152), ("shared_memory_per_core", smem_sm),
          ("threads_per_core_limit", 2048), ("core_count", sms), ("fpus_per_core", fpus),
          ("block_dim_limit_x", 2147483647), ("block_dim_limit_y", 65535),
          ("block_dim_limit_z", 65535), ("memory_bandwidth", int(bandwidth)),
          ("l2_cache_size", l2), ("clock_rate_ghz", clock), ("device_memory_size", hbm),
          ("shared_memory_per_block_optin", smem_optin), ("registers_per_core_limit", 65536),
          ("registers_per_block_limit", 65536))


_H100_HBM, _H200_HBM, _A100_HBM, _B200_HBM = 84942979072, 151397597184, 85100068864, 191514411008
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v5e", "tpu", ("TPU v5 lite", "TPU v5e"), 16 * GiB, 197e12),
    Chip("v5p", "tpu", ("TPU v5p", "TPU v5"), 95 * GiB, 459e12),
    Chip("v6e", "tpu", ("TPU v6 lite", "TPU v6e"), 32 * GiB, 918e12),
    Chip("v4", "tpu", ("TPU v4",), 32 * GiB, 275e12),
    Chip("h100", "gpu", ("H100",), _H100_HBM, 989e12, (9, 0),
         _gpu_info(132, 233472, 232448, 128, 52428800, 3.35232e12, 1.98, _H100_HBM),
         "NVIDIA H100 80GB HBM3"),
    Chip("h200", "gpu", ("H200",), _H200_HBM, 989e12, (9, 0),
         _gpu_info(132, 233472, 232448, 128, 52428800, 4.8e12, 1.98, _H200_HBM),
         "NVIDIA H200 141GB HBM3e"),
    Chip("a100", "gpu", ("A100",), _A100_HBM, 312e12, (8, 0),
         _gpu_info(108, 167936, 166912, 64, 41943040, 2.03904e12, 1.41, _A100_HBM),
         "NVIDIA A100-SXM4-80GB"),
    Chip("b200", "gpu", ("B200",), _B200_HBM, 2.25e15, (10, 0),
         _gpu_info(148, 233472, 232448, 128, 132644864, 7.67232e12, 1.965, _B200_HBM),
         "NVIDIA B200"),
    Chip("l4", "gpu", ("L4",), 24 * GiB, 121e12, (8, 9)),
)}


def chip_of(device_kind: str) -> Chip | None:
  """The chip a jax device_kind names (longest match first: "TPU v5 lite" before "TPU v5")."""
  matches = [(len(k), c) for c in CHIPS.values() for k in c.device_kinds
             if k.lower() in device_kind.lower()]
  return max(matches, key=lambda m: m[0])[1] if matches else None


# ----------------------------------------------------------------------------- TPU slices

# generation -> (GKE's cloud.google.com/gke-tpu-accelerator value, TensorCores per chip that
# the name counts, topology rank). v5p names count TensorCores (v5p-128 is 64 chips); v5e and
# v6e count chips.
GENERATIONS = {
    "v5e": ("tpu-v5-lite-podslice", 1, 2),
    "v6e": ("tpu-v6e-slice", 1, 2),
    "v5p": ("tpu-v5p-slice", 2, 3),
}
# Chip count -> GKE's default topology, from GKE's TPU tables (other shapes: an explicit one).
TOPOLOGIES = {
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
        256: "16x16"},
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
}
CHIPS_PER_HOST = 4  # every multi-host v5e/v5p/v6e slice: 4 chips per VM
SINGLE_HOST_MAX_CHIPS_2D = 8  # v5e/v6e slices up to 8 chips are one VM with all of them


def tpu_chips(generation: str, count: int) -> int:
  """The chips in `<generation>-<count>`."""
  per_chip = GENERATIONS[generation][1]
  if count % per_chip:
    raise ValueError(f"{generation}-{count}: {generation} names count TensorCores, "
                     f"{per_chip} per chip")
  return count // per_chip


def default_topology(generation: str, n_chips: int) -> str:
  table = TOPOLOGIES[GENERATIONS[generation][2]]
  if n_chips not in table:
    per_chip = GENERATIONS[generation][1]
    known = ", ".join(f"{generation}-{c * per_chip}" for c in table)
    raise ValueError(f"{generation}: {n_chips} chips has no standard topology (known: {known})")
  return table[n_chips]


def topology_chips(topology: str) -> int:
  n = 1
  for d in topology.split("x"):
    n *= int(d)
  return n


# ----------------------------------------------------------------------------- GPU machines

# GKE machine type -> (chip, GPUs per node).
GPU_MACHINES = {
    "a3-highgpu-8g": ("h100", 8),
    "a3-megagpu-8g": ("h100", 8),
    "a3-ultragpu-8g": ("h200", 8),
    "a2-ultragpu-8g": ("a100", 8),
    "a4-highgpu-8g": ("b200", 8),
}
# XManager's <gpu>x<per node> names (launch/xm_launch.py) -> chip.
XM_GPUS = {"h100": "h100", "h200": "h200", "a100": "a100", "a100_80gib": "a100",
           "b200": "b200", "l4": "l4"}


# ----------------------------------------------------------------------------- a named machine


@dataclasses.dataclass(frozen=True)
class Machine:
  """What a target name means: the chip, how many, and how they are laid out."""

  name: str  # as given: v5p-128, a3-highgpu-8g, h100x8
  chip: Chip
  per_host: int  # chips (GPUs) per host
  hosts: int  # per slice (TPU) or in all (GPU)
  topology: str | None = None  # TPU ICI shape, e.g. 4x4x4
  slices: int = 1

  @property
  def devices(self) -> int:
    return self.per_host * self.hosts * self.slices

  @property
  def label(self) -> str:
    count = f" x {self.slices} slices" if self.slices > 1 else ""
    nodes = f" x {self.hosts} nodes" if self.chip.platform == "gpu" and self.hosts > 1 else ""
    return f"{self.name}{count}{nodes} ({self.devices} x {self.chip.name})"


def machine(name: str, *, slices: int = 1, nodes: int = 1) -> Machine:
  """Parses a target name (module docstring); ValueError naming what is wrong."""
  if slices < 1 or nodes < 1:
    raise ValueError(f"{name}: slices and nodes must be at least 1")
  if m := re.fullmatch(r"(v5e|v5p|v6e)-(\d+)", name):
    if nodes != 1:
      raise ValueError(f"{name}: a TPU slice's hosts come from its topology, not nodes")
    gen = m[1]
    chips = tpu_chips(gen, int(m[2]))
    topology = default_topology(gen, chips)
    single = GENERATIONS[gen][2] == 2 and chips <= SINGLE_HOST_MAX_CHIPS_2D
    per_host = chips if single else CHIPS_PER_HOST
    return Machine(name, CHIPS[gen], per_host, chips // per_host, topology, slices)
  if slices != 1:
    raise ValueError(f"{name}: slices are for TPU names (v5e-N, v5p-N, v6e-N)")
  if name in GPU_MACHINES:
    chip, per_node = GPU_MACHINES[name]
    return Machine(name, CHIPS[chip], per_node, nodes)
  if (m := re.fullmatch(r"([a-z0-9_]+)x(\d+)", name)) and m[1] in XM_GPUS:
    return Machine(name, CHIPS[XM_GPUS[m[1]]], int(m[2]), nodes)
  raise ValueError(
      f"{name!r} is not a target: want v5e-N, v5p-N or v6e-N (with slices), one of "
      f"{', '.join(GPU_MACHINES)} (with nodes), or <gpu>x<count> with gpu in "
      f"{', '.join(XM_GPUS)}")


def gpu_target_config(chip: Chip) -> str:
  """XLA's GpuTargetConfigProto text for `chip` (deviceless GPU compiles)."""
  if chip.platform != "gpu" or not chip.gpu_info:
    raise ValueError(f"{chip.name}: no GPU compile facts")
  major, minor = chip.capability
  # sm_90a / sm_100a: the architecture-specific features (wgmma, TMA multicast) Mosaic GPU uses.
  extension = "ACCELERATED_FEATURES" if major >= 9 else "NONE"
  fields = "".join(f"  {k}: {v}\n" for k, v in chip.gpu_info)
  return (f"gpu_device_info {{\n{fields}"
          f"  cuda_compute_capability {{\n    major: {major}\n    minor: {minor}\n"
          f"    feature_extension: {extension}\n  }}\n}}\n"
          f'platform_name: "CUDA"\n'
          f"dnn_version_info {{\n  major: 9\n  minor: 10\n  patch: 0\n}}\n"
          f'device_description_str: "{chip.description}"\n')
