"""Chunked cross entropy (mm_jax/train/losses.py) equals the whole-sequence one, and its
compiled program never holds float32 [B, T, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from drivers import losses_on_mesh

from mm_jax.train import losses


def _project(head, h):
  w, b = head
  return (jnp.einsum("BTD,DV->BTV", h, w) + b).astype(jnp.float32)


def _problem(b=2, t=50, d=16, v=96, seed=0):
  rng = np.random.default_rng(seed)
  head = (jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32),
          jnp.asarray(rng.normal(size=(v,)), jnp.float32))
  h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  return head, h, targets


@pytest.mark.parametrize("chunk", [7, 16, 25, 50])  # a remainder, a divisor, whole
def test_loss_predictions_and_gradients_equal_the_whole_sequence(chunk):
  head, h, targets = _problem()
  mask = (np.arange(50) % 3 != 0)[None].repeat(2, 0)

  def loss(head, h, c):
    ce, pred = losses.cross_entropy(_project, head, h, targets, c)
    return jnp.where(mask, ce, 0.0).sum() / mask.sum(), (ce, pred)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
  (want, (ce0, pred0)), g0 = grad(head, h, 0)
  (got, (ce1, pred1)), g1 = grad(head, h, chunk)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(ce1, ce0, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(pred1, pred0)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _temp_bytes(chunk: int, b=4, t=1024, d=32, v=4096) -> int:
  head, _, _ = _problem(d=d, v=v)
  h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(head, h, targets):
    return losses.cross_entropy(_project, head, h, targets, chunk)[0].mean()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(head, h, targets).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_the_compiled_gradient_holds_one_chunk_of_logits():
  logits, chunk = 4 * 1024 * 4096 * 4, 4 * 128 * 4096 * 4  # float32 [B, T, V], [B, 128, V]
  whole, chunked = _temp_bytes(0), _temp_bytes(128)
  assert whole >= 2 * logits  # the whole path: the logits and their gradient
  # One chunk's logits and their gradient (the backward's recompute), plus small change.
  assert chunked < 2.5 * chunk, (whole, chunked)


def test_the_train_step_is_the_same_with_chunks():
  # Tied embeddings: the chunked head's gradient meets the embedding's in one weight, the
  # harder case (the untied head is the same computation with its own kernel).
  base = {"train.batch_size": 8, "data.num_train": 64, "mesh.data": 1,
          "model.decoder.tie_embeddings": True}
  *_, want = losses_on_mesh(tiny_config(**base), jax.devices()[:1], 2)
  *_, got = losses_on_mesh(tiny_config(**base, **{"train.loss_chunk": 32}),
                           jax.devices()[:1], 2)  # T = 80: two chunks and a padded one
  for metric in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose(got[metric], want[metric], rtol=1e-5, err_msg=metric)
