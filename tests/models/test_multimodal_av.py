"""MIMO: image, video and audio rows merged by one rule into one stream, any mix per row."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import mimo_config
from flax import nnx

from mm_jax.models.audio import tokens_for_frames
from mm_jax.models.multimodal import MultimodalModel, pool_grid, resolve_backends

ALL = ("image", "video", "audio")


def _model():
  cfg = mimo_config(**{"model.modalities": ALL})
  return cfg.model, MultimodalModel(resolve_backends(cfg.model), rngs=nnx.Rngs(0))


def _batch(m):
  """Row 0: text, image, text, video, text, a 60-frame audio clip, text.
  Row 1: a 100-frame audio clip only (its image and video slots are empty)."""
  p_img, p_vid = m.vision.tokens_per_image, m.video.tokens_per_video(m.vision)
  p_a0, p_a1 = tokens_for_frames(60, m.audio), tokens_for_frames(100, m.audio)
  row0 = ([5] + [m.image_token_id] * p_img + [6] + [m.video_token_id] * p_vid + [7]
          + [m.audio_token_id] * p_a0 + [8])
  row1 = [9] + [m.audio_token_id] * p_a1 + [10]
  t = max(len(row0), len(row1))
  tokens = np.full((2, t), 3, np.int32)
  tokens[0, :len(row0)], tokens[1, :len(row1)] = row0, row1
  keys = jax.random.split(jax.random.key(0), 3)
  s = m.vision.image_size
  return {"tokens": jnp.asarray(tokens),
          "positions": jnp.tile(jnp.arange(t, dtype=jnp.int32), (2, 1)),
          "segment_ids": jnp.ones((2, t), jnp.int32),
          "images": jax.random.normal(keys[0], (2, s, s, 3)),
          "image_valid": jnp.array([True, False]),
          "video": jax.random.normal(keys[1], (2, m.video.num_frames, s, s, 3)),
          "video_valid": jnp.array([True, False]),
          "audio": jax.random.normal(keys[2], (2, 100, m.audio.n_mels)),
          "audio_valid": jnp.array([True, True]),
          "audio_frames": jnp.array([60, 100], jnp.int32)}, (p_img, p_vid, p_a0, p_a1)


def test_every_modality_lands_on_its_placeholders():
  m, model = _model()
  batch, (p_img, p_vid, p_a0, p_a1) = _batch(m)
  merged = model.embed(batch)
  rows = {mod.name: model.embed_media(mod, batch) for mod in model.modalities}
  image, _ = rows["image"]
  video, _ = rows["video"]
  audio, audio_valid = rows["audio"]
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  at = 1
  close(merged[0, at:at + p_img], image[:p_img])
  at += p_img + 1
  close(merged[0, at:at + p_vid], video[:p_vid])
  at += p_vid + 1
  per_clip = audio.shape[0] // 2
  assert int(audio_valid[:per_clip].sum()) == p_a0 and int(audio_valid[per_clip:].sum()) == p_a1
  close(merged[0, at:at + p_a0], audio[:p_a0])  # a clip's valid rows come first
  close(merged[1, 1:1 + p_a1], audio[per_clip:per_clip + p_a1])
  text = model.decoder.embed(batch["tokens"])
  close(merged[1, 0], text[1, 0])
  close(merged[1, 1 + p_a1:], text[1, 1 + p_a1:])


def test_video_pooling_averages_2x2_patches():
  x = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)  # a 4x4 grid
  pooled = pool_grid(x, 2)
  grid = np.asarray(x).reshape(2, 4, 4, 3)
  np.testing.assert_allclose(pooled[:, 0], grid[:, :2, :2].mean((1, 2)))
  np.testing.assert_allclose(pooled[:, 3], grid[:, 2:, 2:].mean((1, 2)))


def test_gradients_reach_every_tower_and_projector():
  m, model = _model()
  batch, _ = _batch(m)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits = nnx.merge(graphdef, params, rest)(batch)
    return jnp.mean(logits ** 2)

  grads = jax.grad(loss)(params)
  norms = {}
  for path, g in nnx.to_flat_state(grads):
    name = "/".join(map(str, path[:2]))
    norms[name] = norms.get(name, 0.0) + float(jnp.sum(g[...] ** 2))
  for name in ("towers/image", "towers/audio", "projectors/image", "projectors/video",
               "projectors/audio"):
    assert norms[name] > 0, (name, norms)
