"""Hugging Face LlavaNextVideoForConditionalGeneration -> mm_jax MultimodalModel (video).

transformers' (5.x) `LlavaNextVideoModel.get_video_features`: the frames of each video run
through the vision tower one by one; `hidden_states[vision_feature_layer]`, the class token
dropped ("default"); `vision_resampler`, a parameter-free AvgPool2d(spatial_pool_stride)
over the row-major patch grid; then the same `multi_modal_projector` as images. No
`image_newline` is added to video rows. That is our video path (`pool_grid` between the
tower and the projector) with video.pool = spatial_pool_stride, so the weights are the
LLaVA ones (`hf_mapping.llava_rules`) and `image_newline` is left out.

LLaVA-NeXT's own image path (anyres tiles + `image_newline`) is not ours: the config reader
gives modalities=("video",). A preset that also reads images, or that keeps a separate
video tower or projector, gets each of them initialised from the one HF tower / projector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mm_jax.config import ModelConfig, VideoConfig
from mm_jax.interop import hf_config as hc
from mm_jax.interop import hf_mapping as hm

_NEWLINE = ("image_newline", "model.image_newline")  # 4.x / 5.x key; LLaVA-NeXT images only


def model_config_from_hf_llava_next_video(hf_config: Mapping[str, Any], num_frames: int,
                                          **overrides: Any) -> ModelConfig:
  """LlavaNextVideoConfig dict -> ModelConfig reading video only (shared tower and projector).

  num_frames: frames per video; HF takes any count per call, our placeholders are fixed.
  """
  c = hf_config
  mode = c.get("spatial_pool_mode", "average")
  hc.expect(mode == "average", "spatial_pool_mode",
             f"{mode!r}: only average pooling (parameter-free) is supported")
  token = c.get("video_token_index", c.get("video_token_id"))
  hc.expect(token is not None, "video_token_index", "missing (nor is video_token_id set)")
  base = hc.model_config_from_hf_llava(c)
  # "full" keeps CLIP's class token: HF's pooler then fails on the non-square 1 + g*g rows.
  hc.expect(base.vision.feature_select == "patch", "vision_feature_select_strategy",
             "video pooling needs patch features ('default' for CLIP)")
  video = VideoConfig(num_frames=num_frames, pool=int(c.get("spatial_pool_stride", 2)),
                      tower="shared", projector="shared")
  cfg = dataclasses.replace(base, video=video, modalities=("video",), video_token_id=int(token))
  cfg = dataclasses.replace(cfg, **overrides)
  cfg.validate("model")
  return cfg


def llava_next_video_rules(cfg: ModelConfig) -> list[hm.Rule]:
  """HF keys (5.x) -> our paths: the LLaVA rules, the tower and projector rules repeated for
  each of towers/{image,video} and projectors/{image,video} that `cfg` builds."""
  hc.expect("video" in cfg.modalities, "model.modalities",
             f"{cfg.modalities}: a LLaVA-NeXT-Video checkpoint needs 'video'")
  llava = hm.llava_rules(cfg)  # towers/image, projectors/image, decoder
  rules = [r for r in llava if r.path[0] == "decoder"]
  for group, video_name in (("towers", "image" if cfg.video.tower == "shared" else "video"),
                            ("projectors",
                             "image" if cfg.video.projector == "shared" else "video")):
    names = sorted({video_name} | ({"image"} if "image" in cfg.modalities else set()))
    rules += [dataclasses.replace(r, path=(group, name, *r.path[2:])) for name in names
              for r in llava if r.path[:2] == (group, "image")]
  return rules


def llava_next_video_to_mm(sd: Mapping[str, Any], cfg: ModelConfig) -> hm.Flat:
  """LlavaNextVideoForConditionalGeneration state dict (4.x or 5.x layout) -> params.

  `image_newline` is dropped; any other tensor without a parameter (e.g. a conv
  `vision_resampler`) is refused by `hf_to_mm`.
  """
  sd = {k: v for k, v in hm.normalize_keys(sd, "llava").items() if k not in _NEWLINE}
  sd = hm._untie(sd, "model.language_model.embed_tokens.weight", cfg.decoder.tie_embeddings)
  return hm.hf_to_mm(sd, llava_next_video_rules(cfg))
