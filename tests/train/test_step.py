import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from drivers import losses_on_mesh
from flax import nnx

from configs import llava
from mm_jax import run, sharding
from mm_jax.config import ConfigError
from mm_jax.data import pipeline
from mm_jax.train import batches
from mm_jax.train import state as state_lib
from mm_jax.train.step import token_losses, train_step

SMALL = {"train.batch_size": 8, "data.num_train": 64, "mesh.data": 1}


def test_gradient_accumulation_matches_one_big_batch():
  # Equal gradient norms and equal losses over 3 steps (the later losses depend on the
  # updated parameters). Parameters are not compared: Adam divides near-zero gradients by
  # their own magnitude, which turns summation-order noise into visible differences.
  *_, base = losses_on_mesh(tiny_config(**SMALL), jax.devices()[:1], 3)
  *_, accum = losses_on_mesh(tiny_config(**SMALL, **{"optim.grad_accum": 4}),
                             jax.devices()[:1], 3)
  for metric in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose(accum[metric], base[metric], rtol=1e-5, err_msg=metric)


def test_frozen_parameters_have_no_optimizer_state_and_do_not_move():
  cfg = tiny_config(**SMALL, **{"optim.freeze": (r"^towers/", r"^decoder/")})
  _, state, built, _ = losses_on_mesh(cfg, jax.devices()[:1], 2)
  trainable = {p[0] for p, _ in nnx.to_flat_state(state.params)}
  assert trainable == {"projectors"}
  opt_leaves = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  assert opt_leaves <= 2 * n_trainable + 8  # Adam's mu and nu (+ counters) for trainables only
  init = state_lib.initialise(built)  # same seed: the initial values
  for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(init.frozen), strict=True):
    np.testing.assert_array_equal(x, y)


def test_loss_counts_only_masked_tokens():
  cfg = tiny_config(**SMALL)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  built = state_lib.build(cfg, mesh)
  spec = batches.row_spec(cfg)
  batch = next(pipeline.train_iterator(cfg.data, spec, global_batch=8, seed=0))
  with jax.set_mesh(mesh):
    state = state_lib.initialise(built)
    step = jax.jit(functools.partial(train_step, built.fns))
    _, m1 = step(state, jax.tree.map(jnp.asarray, batch))
    ce, _ = token_losses(built.fns, state.params, state.frozen, batch)
  mask = batch["loss_mask"]
  np.testing.assert_allclose(m1["loss"], (ce * mask).sum() / mask.sum(), rtol=1e-5)
  changed = dict(batch, targets=np.where(mask, batch["targets"], 5))  # unmasked targets only
  state2 = state_lib.initialise(built)
  with jax.set_mesh(mesh):
    _, m2 = step(state2, jax.tree.map(jnp.asarray, changed))
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)


@pytest.mark.parametrize("batch, accum, micro_batches, message", [
    (10, 1, True, "config.train.batch_size: 10 does not split over 4 data-parallel devices "
     "(mesh data x fsdp): it must be a multiple of 4 (nearest: 8 or 12)"),
    (2, 1, True, "config.train.batch_size: 2 does not split over 4 data-parallel devices "
     "(mesh data x fsdp): it must be a multiple of 4 (nearest: 4)"),
    (8, 4, True, "config.train.batch_size: 8 does not split into 4 micro-batches "
     "(config.optim.grad_accum) over 4 data-parallel devices (mesh data x fsdp): it must be "
     "a multiple of 4 x 4 = 16 (nearest: 16)"),
    (12, 2, True, "config.train.batch_size: 12 does not split into 2 micro-batches "
     "(config.optim.grad_accum) over 4 data-parallel devices (mesh data x fsdp): it must be "
     "a multiple of 2 x 4 = 8 (nearest: 8 or 16)"),
    (8, 4, False, None),  # eval: the whole batch over the devices, no micro-batches
    (10, 1, False, "config.train.batch_size: 10 does not split over 4 data-parallel devices "
     "(mesh data x fsdp): it must be a multiple of 4 (nearest: 8 or 12)"),
])
def test_batches_must_split_over_data_parallel_devices(batch, accum, micro_batches, message):
  from mm_jax import config as config_lib

  cfg = tiny_config(**{"train.batch_size": batch, "optim.grad_accum": accum, "mesh.data": 4})
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
  if message is None:
    batches.check_batch(cfg, mesh, micro_batches=micro_batches)
    return
  with pytest.raises(config_lib.ConfigError) as e:
    batches.check_batch(cfg, mesh, micro_batches=micro_batches)
  assert str(e.value) == message


def test_eval_mode_checks_the_runs_batch_on_this_hosts_devices(tmp_path):
  """--mode=eval reads the run's batch size, maybe on another machine: one line, no
  IndivisibleError from the first batch."""
  cd = llava.get_config("tiny")
  cd.train.batch_size = 12
  with pytest.raises(ConfigError, match=r"^config\.train\.batch_size: 12 does not "
                     r"split over 8 data-parallel devices .* \(nearest: 8 or 16\)$"):
    run.main(cd, str(tmp_path), "eval")


def test_a_nonfinite_update_applies_nothing():
  """lr 1e39 is inf in float32: finite loss and gradient, an inf update. No step may change
  the state: each is skipped and counted, parameters and optimizer state as they were."""
  cfg = tiny_config(**SMALL, **{"optim.lr": 1e39, "optim.warmup_steps": 0,
                                "optim.schedule": "constant"})
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  built = state_lib.build(cfg, mesh)
  data = pipeline.train_iterator(cfg.data, batches.row_spec(cfg), global_batch=8, seed=0)
  step = jax.jit(functools.partial(train_step, built.fns))
  with jax.set_mesh(mesh):
    state = state_lib.initialise(built)
    skipped = []
    for _ in range(2):
      before = jax.device_get((state.params, state.opt_state))
      state, m = step(state, jax.tree.map(jnp.asarray, next(data)))
      skipped.append(int(m["skipped_nonfinite"]))
      if skipped[-1]:
        after = jax.device_get((state.params, state.opt_state))
        for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
          np.testing.assert_array_equal(x, y)
  assert skipped == [1, 1], skipped
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
