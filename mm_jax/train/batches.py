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


def check_batch(cfg: Config, mesh) -> None:
  """Every micro-batch must split evenly over the data-parallel devices (else XLA
  reshuffles rows between devices on every step)."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = cfg.train.batch_size // cfg.optim.grad_accum
  if micro % dp:
    raise config_lib.ConfigError(
        f"config.optim.grad_accum: micro-batch {micro} (train.batch_size "
        f"{cfg.train.batch_size} / {cfg.optim.grad_accum}) not divisible by {dp} "
        "data-parallel devices (mesh data x fsdp)")
