"""`model.remat = none | full | dots` changes memory, never values: the tiny model's loss
and gradients (vision tower, projector, decoder) agree across the three modes. The audio
tower wraps its blocks with the same `remat.wrap`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

from mm_jax.config import ConfigError, from_config_dict
from mm_jax.data import pipeline
from mm_jax.models.multimodal import MultimodalModel, resolve_backends
from mm_jax.train import batches

MODES = ("none", "full", "dots")


def _loss_and_grads(mode: str, batch: dict):
  cfg = tiny_config(**{"model.remat": mode})
  # Built eagerly (same seed, same weights in every mode): jitting the init costs more here.
  model = MultimodalModel(resolve_backends(cfg.model), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits = nnx.merge(graphdef, params)(batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    return (ce * mask).sum() / mask.sum()

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return value, nnx.to_flat_state(grads)


def _assert_close(got: list, want: list, what: str):
  # rtol 1e-6 of the largest gradient entry: remat reruns the forward pass inside the
  # backward one, where XLA may fuse and so round differently; entries that are zero in
  # exact arithmetic (the key biases: softmax ignores a shift of every score) move by
  # ~1e-10, where a per-element rtol is not meaningful.
  scale = max(float(np.max(np.abs(w))) for w in want)
  for (path, g), w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * scale, err_msg=f"{what}: {path}")


def test_remat_modes_give_identical_loss_and_gradients():
  cfg = tiny_config()
  batch = next(pipeline.train_iterator(cfg.data, batches.row_spec(cfg), global_batch=4, seed=0))
  batch = jax.tree.map(jnp.asarray, batch)
  base_loss, base_grads = _loss_and_grads("none", batch)
  assert len(base_grads) > 20  # towers, projector and decoder all get gradients
  for mode in MODES[1:]:
    value, grads = _loss_and_grads(mode, batch)
    np.testing.assert_allclose(value, base_loss, rtol=1e-6, err_msg=mode)
    assert [p for p, _ in grads] == [p for p, _ in base_grads]
    _assert_close([(p, np.asarray(g[...])) for p, g in grads],
                  [np.asarray(g[...]) for _, g in base_grads], mode)


def test_unknown_remat_mode_names_the_key():
  with pytest.raises(ConfigError, match="config.model.remat: must be one of"):
    tiny_config(**{"model.remat": "some"})
  with pytest.raises(ConfigError, match="config.model.remat: expected str"):
    from_config_dict({"model": {"remat": True}})  # the old bool: say what it takes now


def test_remat_with_frozen_modules_under_grad():
  """The train step's situation: frozen parameters enter from outside jax.grad (they are
  jit arguments, not differentiated). nnx.remat refused this in flax 0.12.8
  (TraceContextError), so every big preset's pretrain/finetune stage failed to step."""
  cfg = tiny_config(**{"model.remat": "full"})
  batch = next(pipeline.train_iterator(cfg.data, batches.row_spec(cfg), global_batch=2, seed=0))
  batch = jax.tree.map(jnp.asarray, batch)
  model = MultimodalModel(resolve_backends(cfg.model), rngs=nnx.Rngs(0))
  towers = nnx.PathContains("towers")
  graphdef, frozen, params = nnx.split(model, nnx.All(nnx.Param, towers), ...)

  @jax.jit
  def step(params, frozen):
    def loss(params):
      logits = nnx.merge(graphdef, frozen, params)(batch)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
      return jnp.where(batch["loss_mask"], ce, 0.0).sum()
    return jax.value_and_grad(loss)(params)

  value, grads = step(params, frozen)
  assert np.isfinite(float(value))
  assert not any("towers" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads))
