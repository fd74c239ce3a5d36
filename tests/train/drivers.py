"""Small drivers shared by the train tests: build, step and restore on a chosen mesh."""

import functools

import jax
import numpy as np

from mm_jax import sharding
from mm_jax.data import pipeline
from mm_jax.train import batches
from mm_jax.train import state as state_lib
from mm_jax.train.step import train_step


def losses_on_mesh(cfg, devices, steps: int):
  """(losses, final state, build, every metric's trajectory) of `steps` train steps on a
  mesh over `devices`."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  built = state_lib.build(cfg, mesh)
  spec = batches.row_spec(cfg)
  batch_sh = batches.batch_shardings(mesh, spec, cfg.train.batch_size)
  fn = jax.jit(functools.partial(train_step, built.fns),
               in_shardings=(built.shardings, batch_sh), out_shardings=(built.shardings, None))
  data = pipeline.train_iterator(cfg.data, spec, global_batch=cfg.train.batch_size, seed=0)
  history = []
  with jax.set_mesh(mesh):
    state = state_lib.initialise(built)
    for _ in range(steps):
      state, m = fn(state, pipeline.global_batch(next(data), batch_sh))
      history.append(jax.device_get(m))
  metrics = {k: np.array([h[k] for h in history]) for k in history[0]}
  return metrics["loss"], state, built, metrics
