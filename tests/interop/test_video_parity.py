"""Parity with transformers' LlavaNextVideoForConditionalGeneration on video-only inputs,
loaded through `mm_jax.interop.video_mapping` from a tiny random float32 model (no
download). Tolerance as test_hf_parity.py: max|ours - ref| <= 1e-4 * max|ref|, at
"highest" matmul precision.
"""

from __future__ import annotations

import functools

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import IMAGE, IMAGE_TOKEN, TEXT, VISION, hf_model, state_dict

from mm_jax.config import ConfigError, VideoConfig
from mm_jax.interop import hf_mapping as hm
from mm_jax.interop import video_mapping as vm
from mm_jax.models.multimodal import MultimodalModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
assert_close = functools.partial(hf_models.assert_close, tol=TOL)
VIDEO_TOKEN = IMAGE_TOKEN - 1  # inside the vocabulary, as in llava-hf checkpoints
FRAMES = 3  # 28 / 7 = 4x4 patches per frame, pooled 2x2: 4 rows per frame


def llava_next_video_hf(**kw):
  config = transformers.LlavaNextVideoConfig(
      vision_config=transformers.CLIPVisionConfig(**VISION).to_dict(),
      text_config=transformers.LlamaConfig(**TEXT).to_dict(), image_token_index=IMAGE_TOKEN,
      video_token_index=VIDEO_TOKEN, vision_feature_layer=-2,
      vision_feature_select_strategy="default", spatial_pool_mode="average",
      spatial_pool_stride=2, image_grid_pinpoints=[[IMAGE, IMAGE]], **kw)
  return hf_model(transformers.LlavaNextVideoForConditionalGeneration, config)


@pytest.fixture(scope="module")
def ref():
  return llava_next_video_hf()


def video_batch(n_videos: int, per_video: int, seed: int = 0):
  """One video per row at different offsets; (HF input_ids, HF pixel_values_videos, our
  batch). HF takes [B, F, C, H, W]; ours [B * Mv, F, H, W, C] with Mv = 1."""
  rng = np.random.default_rng(seed)
  text = lambda n: list(rng.integers(0, VIDEO_TOKEN, n))
  rows = [text(2 + i) + [VIDEO_TOKEN] * per_video + text(3 - i) for i in range(n_videos)]
  tokens = np.array(rows, np.int64)
  pixels = rng.normal(size=(n_videos, FRAMES, 3, IMAGE, IMAGE)).astype(np.float32)
  batch = dict(tokens=jnp.asarray(tokens, jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                          tokens.shape),
               segment_ids=jnp.ones(tokens.shape, jnp.int32),
               video=jnp.asarray(pixels.transpose(0, 1, 3, 4, 2)),
               video_valid=jnp.ones((n_videos,), bool))
  return tokens, pixels, batch


def test_llava_next_video_matches_hf_on_video_only_inputs(ref):
  cfg = vm.model_config_from_hf_llava_next_video(ref.config.to_dict(), num_frames=FRAMES,
                                                 attention="xla", merge="xla")
  assert (cfg.modalities, cfg.video_token_id, cfg.video.pool) == (("video",), VIDEO_TOKEN, 2)
  assert (cfg.video.tower, cfg.video.projector, cfg.vision.feature_layer) == ("shared",
                                                                              "shared", -2)
  per_video = cfg.video.tokens_per_video(cfg.vision)
  assert per_video == FRAMES * 2 * 2
  model = nnx.eval_shape(lambda: MultimodalModel(cfg, rngs=nnx.Rngs(0)))
  hm.load_flat_into(model, vm.llava_next_video_to_mm(state_dict(ref), cfg))
  tokens, pixels, batch = video_batch(2, per_video)  # two rows: videos kept in order
  with torch.no_grad():
    videos = torch.from_numpy(pixels)
    want_rows = ref.model.get_video_features(videos).pooler_output.numpy()  # [B, F*4, D]
    want = ref(input_ids=torch.from_numpy(tokens), pixel_values_videos=videos).logits.numpy()
  video = next(m for m in model.modalities if m.name == "video")
  with jax.default_matmul_precision("highest"):
    rows, valid = jax.device_get(nnx.jit(lambda m, b: m.embed_media(video, b))(model, batch))
    logits = jax.device_get(nnx.jit(lambda m, b: m(b))(model, batch))
  assert bool(valid.all())
  # The rows first: a pooling order or projector mix-up shows here, not only in the logits.
  assert_close(rows.reshape(want_rows.shape), want_rows, "video features")
  assert_close(logits, want, "llava-next-video logits")


def test_video_mapping_layouts_newline_and_separate_modules(ref):
  sd = state_dict(ref)
  assert "model.image_newline" in sd and not any("vision_resampler" in k for k in sd)
  cfg = vm.model_config_from_hf_llava_next_video(ref.config.to_dict(), num_frames=FRAMES)
  flat = vm.llava_next_video_to_mm(sd, cfg)
  # The published (4.x) layout: vision_tower.vision_model.*, language_model.model.*, ...
  old = {k.replace("model.vision_tower.", "vision_tower.vision_model.")
          .replace("model.language_model.", "language_model.model.")
          .replace("model.multi_modal_projector.", "multi_modal_projector.")
          .replace("model.image_newline", "image_newline")
          .replace("lm_head.", "language_model.lm_head."): v for k, v in sd.items()}
  flat_old = vm.llava_next_video_to_mm(old, cfg)
  assert flat.keys() == flat_old.keys()
  assert all(np.array_equal(flat[p], flat_old[p]) for p in flat)
  # MIMO-style: images too, separate video tower and projector, all from the one HF module.
  both = vm.model_config_from_hf_llava_next_video(
      ref.config.to_dict(), num_frames=FRAMES, modalities=("image", "video"),
      video=VideoConfig(num_frames=FRAMES, tower="separate", projector="separate"))
  flat_both = vm.llava_next_video_to_mm(sd, both)
  model = nnx.eval_shape(lambda: MultimodalModel(both, rngs=nnx.Rngs(0)))
  assert set(flat_both) == {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for tail in (("patch", "kernel"), ("fc1", "kernel")):
    group = "towers" if tail[0] == "patch" else "projectors"
    np.testing.assert_array_equal(flat_both[(group, "video", *tail)],
                                  flat_both[(group, "image", *tail)])
  with pytest.raises(ValueError, match=r"unexpected \['model.vision_resampler.pool.weight'\]"):
    vm.llava_next_video_to_mm({**sd, "model.vision_resampler.pool.weight": np.zeros(1)}, cfg)


def test_video_config_reader_refuses_what_we_cannot_express(ref):
  c = ref.config.to_dict()
  with pytest.raises(ConfigError, match="spatial_pool_mode"):
    vm.model_config_from_hf_llava_next_video(c | {"spatial_pool_mode": "conv"}, FRAMES)
  with pytest.raises(ConfigError, match="vision_feature_select_strategy"):
    vm.model_config_from_hf_llava_next_video(c | {"vision_feature_select_strategy": "full"},
                                             FRAMES)
  with pytest.raises(ConfigError, match="model.video.pool"):  # 3 does not divide the 4x4 grid
    vm.model_config_from_hf_llava_next_video(c | {"spatial_pool_stride": 3}, FRAMES)
