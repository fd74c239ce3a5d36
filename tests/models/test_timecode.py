"""Time codes: a video frame and the audio tokens of the same span of the clip share one."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import mimo_config
from flax import nnx

from mm_jax.data import pipeline
from mm_jax.models.multimodal import MultimodalModel, resolve_backends
from mm_jax.timeslots import audio_slots


def test_audio_slots_split_a_clip_by_token_centres():
  # 25 tokens (1 s at 25 per second), 4 frames: centres 0.02 .. 0.98 s in quarters.
  np.testing.assert_array_equal(audio_slots(np.arange(25), 25, 4),
                                [0] * 6 + [1] * 6 + [2] * 7 + [3] * 6)
  for n, slots in [(7, 3), (50, 8), (3, 3), (100, 6)]:
    t = np.arange(n + 5)  # 5 padding tokens past the clip: clipped to the last slot
    host = audio_slots(t, n, slots)
    np.testing.assert_array_equal(host, np.asarray(audio_slots(jnp.asarray(t), n, slots)))
    centre = (t[:n] + 0.5) / n * slots
    np.testing.assert_array_equal(host[:n], np.floor(centre))
    assert (host[n:] == slots - 1).all()


def test_interleaved_placeholders_follow_the_same_slots():
  cfg = mimo_config(**{"model.video.num_frames": 4})
  spec = pipeline.RowSpec.create(cfg.data, cfg.model)
  words, tags = pipeline.av_tags(["<video>", "<audio>", "hi"], spec, [25], interleave=True)
  assert words == ["<video>", "<audio>"] * 4 + ["hi"]
  assert tags["<audio>"][1] == [6, 6, 7, 6]


def test_learned_codes_add_one_vector_per_slot_to_both_modalities():
  cfg = mimo_config(**{"model.time_code": "learned"}).model
  model = MultimodalModel(resolve_backends(cfg), rngs=nnx.Rngs(0))
  f, s, p = cfg.video.num_frames, cfg.vision.image_size, cfg.video.tokens_per_video(cfg.vision)
  keys = jax.random.split(jax.random.key(1), 2)
  batch = {"video": jax.random.normal(keys[0], (1, f, s, s, 3)), "video_valid": jnp.ones(1, bool),
           "audio": jax.random.normal(keys[1], (2, 100, cfg.audio.n_mels)),
           "audio_valid": jnp.ones(2, bool), "audio_frames": jnp.array([100, 60], jnp.int32)}
  table = model.time_code.table[...]
  (video, audio), with_codes = model.modalities, {}
  for name, codes in [("on", table), ("off", jnp.zeros_like(table))]:
    model.time_code.table[...] = codes
    with_codes[name] = [model.embed_media(m, batch) for m in (video, audio)]
  added = with_codes["on"][0][0] - with_codes["off"][0][0]  # [F * P', D], frame-major
  np.testing.assert_allclose(added, jnp.repeat(table, p // f, axis=0), atol=1e-6)
  added = (with_codes["on"][1][0] - with_codes["off"][1][0]).reshape(2, -1, table.shape[1])
  per_clip = added.shape[1]
  for clip, n in enumerate([25, 15]):  # valid tokens of 100 and 60 log-mel frames
    slots = audio_slots(np.arange(per_clip), n, f)
    np.testing.assert_allclose(added[clip], table[slots], atol=1e-6)
