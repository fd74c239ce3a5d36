"""`model.scan_layers`: a scanned stack computes what the unrolled layers compute.

Both layouts draw the same parameters from the same seed (a Stack builds its blocks in
order, then stacks them), so every comparison is between two builds of one model: loss and
gradients under each remat mode, LLaVA and MIMO (vision, audio towers and the decoder).
Generation through the stacked KV cache: tests/infer/test_generate.py; adapters and
patterns on stacks: tests/train/test_lora.py; HF export: tests/interop/test_hf_export.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mimo_config, tiny_config
from flax import nnx

from mm_jax.data import pipeline
from mm_jax.models import stack
from mm_jax.models.multimodal import MultimodalModel, resolve_backends
from mm_jax.train import batches


def _model(cfg):
  return MultimodalModel(resolve_backends(cfg.model), rngs=nnx.Rngs(0))


def _loss_and_grads(model, batch):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits = nnx.merge(graphdef, params)(batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    return (ce * mask).sum() / mask.sum()

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  flat = {p: np.asarray(g.get_value()) for p, g in nnx.to_flat_state(grads)}
  return float(value), stack.unstack_flat(flat)


def _batch(cfg, n=4):
  it = pipeline.train_iterator(cfg.data, batches.row_spec(cfg), global_batch=n, seed=0)
  return jax.tree.map(jnp.asarray, next(it))


def _assert_grads_close(got: dict, want: dict, what: str):
  assert set(got) == set(want), sorted(map(str, set(got) ^ set(want)))[:6]
  # The same tolerance as tests/models/test_remat.py: a scan body is fused on its own, so
  # it may round differently from the unrolled layers.
  scale = max(float(np.max(np.abs(w))) for w in want.values())
  for path, w in want.items():
    np.testing.assert_allclose(got[path], w, rtol=1e-6, atol=1e-6 * scale,
                               err_msg=f"{what}: {path}")


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_llava_equals_unrolled(remat):
  cfg = tiny_config(**{"model.remat": remat})
  batch = _batch(cfg)
  want_loss, want = _loss_and_grads(_model(cfg), batch)
  scanned = _model(tiny_config(**{"model.remat": remat, "model.scan_layers": True}))
  assert isinstance(scanned.decoder.layers, stack.Stack)
  got_loss, got = _loss_and_grads(scanned, batch)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  _assert_grads_close(got, want, remat)


def test_scanned_mimo_equals_unrolled():
  cfg = mimo_config()
  batch = _batch(cfg, 2)
  want_loss, want = _loss_and_grads(_model(cfg), batch)
  scanned = _model(mimo_config(**{"model.scan_layers": True}))
  assert isinstance(scanned.towers["audio"].blocks, stack.Stack)
  got_loss, got = _loss_and_grads(scanned, batch)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  _assert_grads_close(got, want, "mimo")


def test_stacked_parameters_carry_the_layers_axis():
  model = _model(tiny_config(**{"model.scan_layers": True}))
  depth = tiny_config().model.decoder.depth
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  stacked = [(p, v) for p, v in flat if "scan" in p]
  assert stacked and all(v.get_metadata()["logical_axes"][0] == "layers" for _, v in stacked)
  assert all(v.shape[0] == depth for p, v in stacked if p[0] == "decoder")


def test_vision_hidden_states_equal_unrolled():
  cfg = tiny_config()
  images = jax.random.normal(jax.random.key(1), (2, cfg.model.vision.image_size,
                                                 cfg.model.vision.image_size, 3))
  want = _model(cfg).towers["image"].hidden_states(images)
  scanned = _model(tiny_config(**{"model.scan_layers": True})).towers["image"]
  got = scanned.hidden_states(images)
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scanned(images), _model(cfg).towers["image"](images),
                             rtol=1e-5, atol=1e-5)
