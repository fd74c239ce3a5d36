"""The compiled train step's per-device memory plan: XLA's memory analysis of the step as
`loop.train` jits it (same shardings, donated state), compiled from shapes alone.

Unlike `memory.py`'s estimate, these are the compiler's own figures for this backend and
mesh: argument (the state and batch shards one device holds), output, temp (every
intermediate, activations and gradients included, at the schedule's peak) and the
aliased bytes that donation reuses. On CPU, fake devices give a mesh of any size:
`XLA_FLAGS=--xla_force_host_platform_device_count=8`. XLA's CPU backend schedules and
rematerialises differently from the GPU and TPU ones, so read a CPU plan as that
backend's, an upper bound rather than a GPU figure: `--dry_run --target=NAME` compiles with
the TPU or GPU compiler itself (train/compile_check.py prints the plan either way).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mm_jax import sharding
from mm_jax.config import Config
from mm_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class Plan:
  devices: int
  argument: int
  output: int
  temp: int
  alias: int

  @classmethod
  def of(cls, compiled: jax.stages.Compiled, devices: int) -> Plan:
    """XLA's memory analysis of a compiled step, per device."""
    m = compiled.memory_analysis()
    return cls(devices, m.argument_size_in_bytes, m.output_size_in_bytes,
               m.temp_size_in_bytes, m.alias_size_in_bytes)

  @property
  def total(self) -> int:
    """What one device holds at the peak: arguments, outputs and temporaries, counting
    donated buffers (outputs written over the state) once."""
    return self.argument + self.output + self.temp - self.alias


def lower_train_step(cfg: Config, mesh: jax.sharding.Mesh, built=None) -> jax.stages.Lowered:
  """The train step as `loop.train` jits it, lowered for `mesh` from abstract shapes
  (nothing is allocated). `built`: the state_lib.build of `cfg` on `mesh`, when the caller
  has it."""
  from mm_jax.train import batches, loop
  from mm_jax.train import state as state_lib

  built = built or state_lib.build(cfg, mesh)
  spec, b = batches.row_spec(cfg), cfg.train.batch_size
  batch = {k: jax.ShapeDtypeStruct(shape, dtype)
           for k, (shape, dtype) in pipeline.batch_shapes(spec, b).items()}
  stop = jax.ShapeDtypeStruct((b,), np.bool_)
  fn = loop.jit_train_step(built, batches.batch_shardings(mesh, spec, b),
                           sharding.batch_sharding(mesh, 1))
  with jax.set_mesh(mesh):
    return fn.lower(built.abstract, batch, stop)


def compiled_plan(cfg: Config, mesh: jax.sharding.Mesh, built=None) -> Plan:
  """Compiles `lower_train_step` and returns XLA's per-device memory analysis."""
  lowered = lower_train_step(cfg, mesh, built)
  with jax.set_mesh(mesh):
    return Plan.of(lowered.compile(), mesh.size)
