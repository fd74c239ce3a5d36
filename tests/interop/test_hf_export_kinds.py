"""Every export kind loads strictly into its transformers class (no missing, unexpected or
mismatched keys) with the logits of the model it came from, and carries the run's chat
template and generation config (mm_jax.interop.hf_export, hf_chat)."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import (
  IMAGE,
  TEXT,
  VISION,
  assert_close,
  config_like,
  hf_model,
  llava_batch,
  llava_hf,
  save_hf,
  strict_load,
  torch,
  transformers,
)
from test_hf_import import MESH

from mm_jax import sharding
from mm_jax.config import ConfigError
from mm_jax.data import export as data_export
from mm_jax.data import templates, text
from mm_jax.infer import prompts
from mm_jax.interop import hf, hf_export, hf_tokenizer
from mm_jax.interop import hf_config as hc

TOL = 1e-5


def test_a_siglip_llava_exports_without_the_attention_pool_head(tmp_path):
  ref = llava_hf("siglip", "full", tie=True)
  folder = save_hf(ref, tmp_path / "hf")
  cfg = config_like(hc.model_config_from_hf_llava(ref.config.to_dict()), **MESH,
                    **{"init.llava_from_hf": folder})
  model = hf.load_model(cfg, sharding.make_mesh(cfg.mesh))
  out = str(tmp_path / "out")
  hf_export.export_model(model, cfg, out)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["vision_config"]["vision_use_head"] is False
  exported = strict_load(transformers.LlavaForConditionalGeneration, out)
  tokens, pixels, _ = llava_batch("two_one", cfg.model.vision.tokens_per_image)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels))
    got = exported(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels))
  assert_close(got.logits.numpy(), want.logits.numpy(), "siglip llava logits", TOL)


def _next_video_ref(tmp_path, frames: int):
  config = transformers.LlavaNextVideoConfig(
      vision_config=transformers.CLIPVisionConfig(**VISION).to_dict(),
      text_config=transformers.LlamaConfig(**TEXT).to_dict(), image_token_index=63,
      video_token_index=62, vision_feature_layer=-2, vision_feature_select_strategy="default",
      spatial_pool_mode="average", spatial_pool_stride=2, image_grid_pinpoints=[[IMAGE, IMAGE]])
  ref = hf_model(transformers.LlavaNextVideoForConditionalGeneration, config)
  from mm_jax.interop import video_mapping

  m = video_mapping.model_config_from_hf_llava_next_video(ref.config.to_dict(), frames)
  cfg = config_like(m, **MESH, **{"init.llava_from_hf": save_hf(ref, tmp_path / "hf"),
                                  "model.modalities": ("video",), "model.video.pool": 2,
                                  "model.video.num_frames": frames,
                                  "model.video.tower": "shared",
                                  "model.video.projector": "shared",
                                  "model.video_token_id": 62})
  return ref, cfg


def test_a_video_model_exports_to_llava_next_video(tmp_path):
  frames = 2
  ref, cfg = _next_video_ref(tmp_path, frames)
  mesh = sharding.make_mesh(cfg.mesh)
  model = hf.load_model(cfg, mesh)
  out = str(tmp_path / "out")
  files = hf_export.export_model(model, cfg, out)
  assert "video_preprocessor_config.json" in files and "chat_template.jinja" in files
  exported = strict_load(transformers.LlavaNextVideoForConditionalGeneration, out)
  per_video = cfg.model.video.tokens_per_video(cfg.model.vision)
  rng = np.random.default_rng(0)
  ids = [*rng.integers(0, 62, 3), *[62] * per_video, *rng.integers(0, 62, 2)]
  pixels = rng.normal(size=(1, frames, 3, IMAGE, IMAGE)).astype(np.float32)
  with torch.no_grad():
    want = ref(input_ids=torch.tensor([ids]), pixel_values_videos=torch.from_numpy(pixels))
    got = exported(input_ids=torch.tensor([ids]), pixel_values_videos=torch.from_numpy(pixels))
  assert_close(got.logits.numpy(), want.logits.numpy(), "llava-next-video logits", TOL)
  batch = dict(tokens=np.array([ids], np.int32), positions=np.arange(len(ids))[None],
               segment_ids=np.ones((1, len(ids)), np.int32),
               video=pixels.transpose(0, 1, 3, 4, 2), video_valid=np.ones((1,), bool))
  with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
    ours = jax.device_get(nnx.jit(lambda m, b: m(b))(model, jax.tree.map(np.asarray, batch)))
  assert_close(ours, got.logits.numpy(), "ours vs the export", 1e-4)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.convert_tokens_to_ids("<video>") == 62


def test_what_no_transformers_class_holds_is_refused_with_what_can_be(tiny):
  mimo = tiny(**{"model.modalities": ("image", "video", "audio")})
  with pytest.raises(ConfigError, match=r"config\.model\.modalities: .*audio.*Qwen2-Audio.*"
                     r"exportable: modalities \('image',\) -> LlavaForConditionalGeneration"):
    hf_export.export_kind(mimo.model)
  two_towers = tiny(**{"model.modalities": ("image", "video"), "model.video.tower": "separate"})
  with pytest.raises(ConfigError, match=r"config\.model\.video\.tower: 'separate'.*one tower"):
    hf_export.export_kind(two_towers.model)
  both = tiny(**{"model.modalities": ("image", "video"), "model.video.projector": "shared"})
  assert hf_export.export_kind(both.model) == "llava_next_video"


# ----------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A BPE tokenizer.json trained here on vicuna-style text, `<image>` appended last."""
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  corpus = [templates.VICUNA_V1_SYSTEM + " USER: ASSISTANT:", "What shape is it?",
            "A red circle.", "And its colour?", "It is red."]
  data_export.train_tokenizer(path, corpus * 20)
  return path


def _collapse(ids, tag_id):
  """Runs of a placeholder id -> one id (HF's tokenizer writes the tag once; its processor
  expands it)."""
  return [i for n, i in enumerate(ids) if i != tag_id or n == 0 or ids[n - 1] != tag_id]


@pytest.mark.parametrize("template", ["vicuna_v1", "plain", "synthetic"])
def test_the_exported_chat_template_prompts_exactly_as_training(tiny, bpe, tmp_path, template):
  if template == "synthetic":
    cfg = tiny()
  else:
    ours = text.load_tokenizer(bpe)
    cfg = tiny(**{"data.source": "llava_json", "data.json": "x.json", "data.image_dir": ".",
                  "data.tokenizer": bpe, "data.template": template,
                  "model.image_token_id": ours.tag_id(text.IMAGE_TAG),
                  "model.decoder.vocab_size": ours.vocab_size})
  out = str(tmp_path / "out")
  os.makedirs(out)
  special = hf_tokenizer.write(cfg, out)
  hf_export._write_chat(cfg, out, special)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = prompts.tokenizer_for(cfg)
  image = cfg.model.image_token_id
  question = "what shape is it?" if template == "synthetic" else "What shape is it?"
  answer = "circle" if template == "synthetic" else "A red circle."

  def hf_ids(messages, prompt):
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=prompt,
                                          tokenize=False)
    return hf_tok(rendered, add_special_tokens=False).input_ids

  user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
  want = prompts.encode(cfg, ours, question, n_images=1).tolist()
  assert hf_ids([user], True) == _collapse(want, image)
  if template != "synthetic":  # a whole conversation, as training renders it
    conversation = [("human", f"{text.IMAGE_TAG}\n{question}"), ("gpt", answer)]
    whole = templates.render_conversation(ours, conversation, template,
                                          expand={image: 1}).tokens.tolist()
    assert hf_ids([user, {"role": "assistant", "content": answer}], False) == whole
  generation = json.load(open(os.path.join(out, "generation_config.json")))
  stops = generation["eos_token_id"]
  assert set(prompts.stop_ids(cfg, ours)) == set(stops if isinstance(stops, list) else [stops])
  assert generation["max_new_tokens"] == cfg.generate.max_new_tokens
  assert generation["do_sample"] is False
