import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config
from flax import nnx

from mm_jax.models.multimodal import MultimodalModel, media_index, resolve_backends


def test_media_index_worked_example():
  # P=2, slots [valid, invalid, valid]; one row: a <i> <i> b <i> <i>.
  tokens = jnp.array([[5, 9, 9, 6, 9, 9]])
  idx = media_index(tokens, 9, jnp.repeat(jnp.array([True, False, True]), 2), base=10)
  np.testing.assert_array_equal(idx, [[-1, 10, 11, -1, 14, 15]])


def test_media_index_walks_rows_in_order():
  # Row 0 has no image; row 1 has two; the walk is row-major over the whole batch.
  tokens = jnp.array([[1, 2, 3, 4], [9, 7, 9, 7]])
  idx = media_index(tokens, 9, jnp.array([True, True, False, False]), base=0)
  np.testing.assert_array_equal(idx, [[-1, -1, -1, -1], [0, -1, 1, -1]])


def _model(**overrides):
  cfg = tiny_config(**overrides)
  return cfg, MultimodalModel(resolve_backends(cfg.model), rngs=nnx.Rngs(0))


def test_merge_places_each_image_at_its_tags():
  """Two images at different positions in sample 0, none in sample 1."""
  cfg, model = _model(**{"data.images_per_sample": 2})
  p, img = cfg.model.vision.tokens_per_image, cfg.model.image_token_id
  t = 2 * p + 8
  tokens = np.full((2, t), 7, np.int32)
  tokens[0, 1:1 + p] = img
  tokens[0, p + 5:2 * p + 5] = img
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  batch = {"tokens": jnp.array(tokens), "images": images,
           "image_valid": jnp.array([True, True, False, False])}
  merged = model.embed(batch)
  rows = model.embed_media(model.modalities[0], batch)[0].reshape(4, p, -1)
  np.testing.assert_allclose(merged[0, 1:1 + p], rows[0], rtol=1e-6)
  np.testing.assert_allclose(merged[0, p + 5:2 * p + 5], rows[1], rtol=1e-6)
  text = model.decoder.embed(jnp.array(tokens))
  np.testing.assert_allclose(merged[1], text[1], rtol=1e-6)  # text-only sample untouched
  np.testing.assert_allclose(merged[0, 0], text[0, 0], rtol=1e-6)


def test_text_only_batch_without_image_keys():
  _, model = _model()
  tokens = jnp.arange(16).reshape(2, 8) % 100
  batch = {"tokens": tokens, "positions": jnp.tile(jnp.arange(8), (2, 1)),
           "segment_ids": jnp.ones((2, 8), jnp.int32)}
  logits = model(batch)
  assert logits.shape == (2, 8, 128) and bool(jnp.isfinite(logits).all())


def test_logical_axes_on_every_parameter():
  _, model = _model()
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = v.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == v.ndim, path


def test_pallas_backends_match_xla():
  """The same model with Pallas attention + merge (interpreted on CPU) as with XLA."""
  from mm_jax.data import pipeline

  cfg = tiny_config(**{"data.images_per_sample": 2})
  spec = pipeline.RowSpec.create(cfg.data, cfg.model)
  batch = jax.tree.map(jnp.asarray, next(pipeline.train_iterator(cfg.data, spec,
                                                                 global_batch=2, seed=0)))
  results = []
  for impl in ("xla", "pallas"):
    model_cfg = dataclasses.replace(cfg.model, attention=impl, merge=impl)
    graphdef, params = nnx.split(MultimodalModel(model_cfg, rngs=nnx.Rngs(0)))

    def loss(params, graphdef=graphdef):
      logits = nnx.merge(graphdef, params)(batch)
      return (jax.nn.log_softmax(logits) * jax.nn.one_hot(batch["targets"], 128)).sum()

    with jax.default_matmul_precision("highest"):
      results.append(jax.value_and_grad(loss)(params))
  (l_x, g_x), (l_p, g_p) = results
  np.testing.assert_allclose(l_p, l_x, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_pallas_merge_per_shard_matches_xla_on_a_mesh():
  """Under a 2x2x2 mesh the merge kernel runs per shard with shard-local numbering."""
  from mm_jax import sharding

  cfg = tiny_config(**{"data.images_per_sample": 2})
  p, img = cfg.model.vision.tokens_per_image, cfg.model.image_token_id
  tokens = np.full((4, 2 * p + 8), 7, np.int32)
  tokens[0, 1:1 + p] = img  # row 0: two images; row 1: none; rows 2, 3: one each
  tokens[0, p + 5:2 * p + 5] = img
  tokens[2, 3:3 + p] = img
  tokens[3, 0:p] = img
  valid = np.array([1, 1, 0, 0, 1, 0, 1, 0], bool)
  batch = {"tokens": jnp.asarray(tokens), "image_valid": jnp.asarray(valid),
           "images": jax.random.normal(jax.random.key(0), (8, 32, 32, 3))}
  mesh = sharding.make_mesh(cfg.mesh.__class__(2, 2, 2), jax.devices()[:8])
  merged = {}
  for impl in ("xla", "pallas"):
    model = MultimodalModel(dataclasses.replace(cfg.model, merge=impl), rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
      sharded = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
                 for k, v in batch.items()}
      merged[impl] = jax.jit(lambda b, model=model: model.embed(b))(sharded)
  np.testing.assert_allclose(merged["pallas"], merged["xla"], rtol=1e-6)
