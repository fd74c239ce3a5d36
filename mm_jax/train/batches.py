"""A training batch's layout: the row spec, the shardings of its arrays, and the check that
it splits over the data-parallel devices. Shared by training, eval, the memory plan and the
compile checks."""

from __future__ import annotations

from mm_jax import config as config_lib
from mm_jax import sharding
from mm_jax.config import Config
from mm_jax.data import pipeline


def batch_shardings(mesh, spec: pipeline.RowSpec, batch: int) -> dict:
  return {k: sharding.batch_sharding(mesh, len(shape))
          for k, (shape, _) in pipeline.batch_shapes(spec, batch).items()}


def row_spec(cfg: Config) -> pipeline.RowSpec:
  return pipeline.RowSpec.create(cfg.data, cfg.model)


def check_batch(cfg: Config, mesh, *, micro_batches: bool = True) -> None:
  """Every micro-batch (the whole batch, without `micro_batches`: eval) must split evenly
  over the data-parallel devices (else XLA reshuffles rows between devices on every step).
  The error names config.train.batch_size, its divisor and the nearest values that split."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  accum = cfg.optim.grad_accum if micro_batches else 1
  batch, divisor = cfg.train.batch_size, dp * accum
  if batch % divisor == 0:
    return
  over = f"over {dp} data-parallel devices (mesh data x fsdp)"
  if accum > 1:
    over = f"into {accum} micro-batches (config.optim.grad_accum) {over}"
  below, above = batch // divisor * divisor, (batch // divisor + 1) * divisor
  nearest = f"{below} or {above}" if below else str(above)
  times = f"{accum} x {dp} = " if accum > 1 else ""
  raise config_lib.ConfigError(
      f"config.train.batch_size: {batch} does not split {over}: it must be a multiple of "
      f"{times}{divisor} (nearest: {nearest})")
