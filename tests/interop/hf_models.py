"""Tiny random Hugging Face models and batches shared by the interop tests (float32, built
from configs: nothing is downloaded)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from mm_jax.config import Config, ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE, PATCH = 28, 7  # 16 patches
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE, patch_size=PATCH)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5)


def assert_close(ours, ref, what: str, tol: float) -> None:
  """max|ours - ref| / max|ref| <= tol."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  scale = np.abs(ref).max()
  err = np.abs(ours - ref).max() / scale
  assert err <= tol, f"{what}: relative error {err:.2e} > {tol}"
  np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * scale, err_msg=what)


def randomize(model) -> None:
  """Non-trivial weights: norms 1 +- 0.1, biases/vectors N(0, 0.1), matrices N(0, 1/fan_in)."""
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 0:  # CLIP's logit_scale / SigLIP's logit_bias
        continue
      if p.ndim == 1 and ("norm" in name or "layrnorm" in name):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5))


def hf_model(cls, config):
  torch.manual_seed(0)
  model = cls(config).float().eval()
  randomize(model)
  return model


def state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def images_np(n: int, seed: int = 0) -> np.ndarray:
  """float32[n, 3, H, W] (NCHW as transformers takes it)."""
  return np.random.default_rng(seed).normal(size=(n, 3, IMAGE, IMAGE)).astype(np.float32)


def nhwc(x: np.ndarray) -> jax.Array:
  return jnp.asarray(x.transpose(0, 2, 3, 1))


IMAGE_TOKEN = TEXT["vocab_size"] - 1  # inside the vocabulary, as in llava-hf checkpoints


def llava_hf(vision: str, strategy: str, tie: bool = False, image_token: int = IMAGE_TOKEN):
  vision_cfg = (transformers.CLIPVisionConfig if vision == "clip"
                else transformers.SiglipVisionConfig)(**VISION).to_dict()
  text_cfg = transformers.LlamaConfig(**TEXT, tie_word_embeddings=tie).to_dict()
  config = transformers.LlavaConfig(vision_config=vision_cfg, text_config=text_cfg,
                                    image_token_index=image_token, vision_feature_layer=-2,
                                    vision_feature_select_strategy=strategy)
  return hf_model(transformers.LlavaForConditionalGeneration, config)


def llava_batch(layout: str, per_image: int, seed: int = 0, image_token: int = IMAGE_TOKEN):
  """Two rows, Mi = 2 slots each; returns (HF input_ids, HF pixel_values, our batch).

  two_one: row 0 has two images at different offsets, row 1 one image;
  two_none: row 0 two images, row 1 text only. HF takes the images in order of appearance.
  """
  rng = np.random.default_rng(seed)
  ph = [image_token] * per_image
  text = lambda n: list(rng.integers(0, min(image_token, TEXT["vocab_size"]), n))
  row0 = text(3) + ph + text(2) + ph + text(3)
  row1 = text(5) + ph + text(len(row0) - 5 - per_image)
  row1 = row1 if layout == "two_one" else text(len(row0))
  tokens = np.array([row0, row1], np.int64)
  n_images = 3 if layout == "two_one" else 2
  pixels = images_np(n_images, seed)
  slots = np.zeros((4, 3, IMAGE, IMAGE), np.float32)
  slots[:n_images] = pixels  # [s0img0, s0img1, s1img0 | invalid, invalid]
  batch = dict(tokens=jnp.asarray(tokens, jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                          tokens.shape),
               segment_ids=jnp.ones(tokens.shape, jnp.int32), images=nhwc(slots),
               image_valid=jnp.arange(4) < n_images)
  return tokens, pixels, batch


def config_like(model: ModelConfig, **overrides) -> Config:
  """The tiny preset with every model field taken from `model` (float32, xla backends),
  then `overrides` (dotted keys, as conftest.tiny_config takes them)."""
  fields = {f"model.{group}.{k}": v for group in ("vision", "projector", "decoder")
            for k, v in dataclasses.asdict(getattr(model, group)).items()}
  fields.update({"model.image_token_id": model.image_token_id, "model.attention": "xla",
                 "model.merge": "xla", "model.dtype": "float32"})
  return tiny_config(**{**fields, **overrides})


def save_hf(model, folder, **kw) -> str:
  model.save_pretrained(str(folder), safe_serialization=True, **kw)
  return str(folder)


def strict_load(cls, folder):
  """`cls.from_pretrained(folder)`, failing on any key it did not load exactly."""
  model, info = cls.from_pretrained(folder, output_loading_info=True)
  for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info.get(kind), (kind, info[kind])
  return model.float().eval()
