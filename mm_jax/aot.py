"""Devices of a machine that is not here, for ahead-of-time compiles ("deviceless").

The TPU compiler (libtpu, from `jax[tpu]`) and XLA's GPU compiler (the CUDA plugin, from
`jax[cuda12]`) both run on a CPU host: `jax.experimental.topologies` describes a TPU slice or
a set of GPUs, and a mesh over those devices compiles with that platform's compiler, Pallas
kernels included. Nothing runs; `compiled.memory_analysis()` is the target compiler's own
per-device plan. Limits: no GEMM autotuning on GPU, and cuDNN's workspace is not sized.

`prepare` must run before JAX starts its backends (main.py calls it first for --target).
"""

from __future__ import annotations

import os

import jax

from mm_jax import accelerators
from mm_jax.accelerators import Machine


class TargetError(Exception):
  """A target that cannot be compiled for here: one line naming the fix."""


def _pip(extra: str) -> str:
  return f"pip install 'jax[{extra}]=={jax.__version__}'"


def prepare(machine: Machine) -> None:
  """Settings the compilers read when the backends start: CPU is the only runtime, and
  libtpu must neither query a metadata server nor lock the TPU it does not have."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")
  if machine.chip.platform == "tpu":
    os.environ.update(TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost",
                      ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                      TPU_ACCELERATOR_TYPE=_accelerator_type(machine))


def _accelerator_type(machine: Machine) -> str:
  """What a TPU VM's metadata calls the slice (v5p counts TensorCores)."""
  gen = machine.chip.name
  cores = accelerators.GENERATIONS[gen][1]
  return f"{gen}-{accelerators.topology_chips(machine.topology) * cores}"


def devices(machine: Machine) -> list[jax.Device]:
  """The machine's devices, compile-only, in the order a mesh over them expects."""
  from jax.experimental import topologies

  chip = machine.chip
  if chip.platform == "gpu" and not chip.gpu_info:
    known = ", ".join(c.name for c in accelerators.CHIPS.values() if c.gpu_info)
    raise TargetError(f"--target={machine.name}: no compile facts for {chip.name} GPUs "
                      f"(GPUs with them: {known})")
  try:
    if chip.platform == "tpu":
      kw = {"num_slices": machine.slices} if machine.slices > 1 else {}
      topo = topologies.get_topology_desc(
          topology_name=f"{chip.name}:{machine.topology}", platform="tpu", **kw)
    else:
      topo = topologies.get_topology_desc(
          platform="cuda", target_config=accelerators.gpu_target_config(chip),
          topology=f"1x{machine.hosts}x{machine.per_host}")
  except (RuntimeError, NotImplementedError) as e:
    if chip.platform == "tpu" and "not installed" in str(e):
      raise TargetError(f"--target={machine.name}: the TPU compiler (libtpu) is not "
                        f"installed: {_pip('tpu')}") from None
    if chip.platform == "gpu" and "not implemented for cuda" in str(e):
      raise TargetError(f"--target={machine.name}: XLA's GPU compiler (the CUDA plugin) is "
                        f"not installed: {_pip('cuda12')}") from None
    raise TargetError(f"--target={machine.name}: {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0]}") from None
  got = list(topo.devices)
  if len(got) != machine.devices:
    raise TargetError(f"--target={machine.name}: the topology gave {len(got)} devices, "
                      f"expected {machine.devices}")
  return got
