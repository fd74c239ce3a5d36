"""A run starts from a Hugging Face folder with no shape overrides (mm_jax.interop.hf_adopt).

Each case writes a tiny random folder in a layout of real checkpoints, parses main.py's
flags with the real ml_collections config flag from the `tiny` preset plus
`--config.init.*_from_hf` only, resolves the config as main.py does (mm_jax.run.resolve),
streams the weights in (hf.load_model) and compares logits and greedy ids with
transformers. Tolerance: max|ours - ref| <= 1e-4 * max|ref| (test_hf_parity's), fixed.
"""

from __future__ import annotations

import functools
import json
import os

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from hf_models import IMAGE, PATCH, hf_model, images_np, nhwc, save_hf
from ml_collections import config_flags

from mm_jax import cli, run, sharding
from mm_jax.config import ConfigError
from mm_jax.infer import generate
from mm_jax.interop import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

assert_close = functools.partial(hf_models.assert_close, tol=1e-4)
NEW = 6  # greedy tokens compared


def resolve(argv: list[str]):
  """main.py's --config flag parsed from `argv` in a fresh FlagValues, then resolved."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", cli.DEFAULT_CONFIG, "Run config.",
                                  flag_values=fv, sys_argv=["main.py", *argv])
  fv(["main.py", *argv])
  return run.resolve(fv.config, None, "train", cli.explicit_keys(argv))


# ----------------------------------------------------------------------------- folders

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=IMAGE, patch_size=PATCH)
# GQA 6:2, rope_theta 1e6, untied: the shape kinds the 1b preset does not have.
GQA = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
           num_attention_heads=6, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
           tie_word_embeddings=False)


def llava_folder(tmp, vision="clip", strategy="full", layer=-3, text=None, tie=False,
                 shards=1):
  vc = (transformers.CLIPVisionConfig if vision == "clip"
        else transformers.SiglipVisionConfig)(**VISION).to_dict()
  tc = transformers.LlamaConfig(**{**(text or GQA), "tie_word_embeddings": tie}).to_dict()
  config = transformers.LlavaConfig(vision_config=vc, text_config=tc,
                                    image_token_index=tc["vocab_size"] - 1,
                                    vision_feature_layer=layer,
                                    vision_feature_select_strategy=strategy,
                                    tie_word_embeddings=tie)
  ref = hf_model(transformers.LlavaForConditionalGeneration, config)
  kw = {}
  if shards > 1:  # max_shard_size in bytes: about `shards` files
    size = sum(p.numel() * 4 for p in ref.parameters())
    kw["max_shard_size"] = size // shards + 1
  return ref, save_hf(ref, tmp / f"llava_{vision}", **kw)


def llava_inputs(ref, per_image: int, seed: int = 0):
  """One row: text, the image's placeholders, text; (HF ids, HF pixels, our batch)."""
  token = ref.config.image_token_index
  rng = np.random.default_rng(seed)
  ids = [*rng.integers(0, token, 3), *[token] * per_image, *rng.integers(0, token, 4)]
  pixels = images_np(1, seed)
  batch = generate.left_pad([np.array(ids, np.int32)], 0, multiple=1)
  batch.update(images=np.asarray(nhwc(pixels)), image_valid=np.ones((1,), bool))
  return np.array([ids], np.int64), pixels, batch


def ours_logits(model, batch):
  keys = dict(tokens=batch["tokens"], positions=batch["positions"],
              segment_ids=batch["token_valid"].astype(np.int32))
  keys.update({k: batch[k] for k in ("images", "image_valid", "video", "video_valid")
               if k in batch})
  with jax.default_matmul_precision("highest"):
    return jax.device_get(nnx.jit(lambda m, b: m(b))(model, {k: jnp.asarray(v)
                                                             for k, v in keys.items()}))


def compare_llava(ref, cfg, per_image):
  mesh = sharding.make_mesh(cfg.mesh)
  model = hf.load_model(cfg, mesh)
  ids, pixels, batch = llava_inputs(ref, per_image)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids),
               pixel_values=torch.from_numpy(pixels)).logits.numpy()
    # No stop id on either side (min_new_tokens would instead mask HF's eos logit).
    ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 0
    hf_ids = ref.generate(input_ids=torch.from_numpy(ids),
                          pixel_values=torch.from_numpy(pixels), max_new_tokens=NEW,
                          do_sample=False)[0, ids.shape[1]:].tolist()
  with jax.set_mesh(mesh):
    got = ours_logits(model, batch)
    ours_ids = generate.Generator(model, generate.Decoding(max_new_tokens=NEW))(batch)[0]
  assert_close(got, want, "logits")
  assert ours_ids == hf_ids
  return float(np.abs(got - want).max() / np.abs(want).max())


# ----------------------------------------------------------------------------- LLaVA


def test_a_llava_folder_sets_every_shape_field(tmp_path, capsys):
  """CLIP feature layer -3 with the class token kept, GQA 6:2, rope_theta 1e6, untied
  embeddings, 5 safetensors shards: one flag, no shape overrides."""
  ref, folder = llava_folder(tmp_path, shards=5)
  shards = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
  assert len(shards) >= 5
  cfg = resolve([f"--config.init.llava_from_hf={folder}"])
  m = cfg.model
  assert (m.vision.feature_layer, m.vision.feature_select, m.vision.depth) == (-3, "cls_patch",
                                                                                3)
  assert (m.decoder.heads, m.decoder.kv_heads, m.decoder.width) == (6, 2, 48)
  assert (m.decoder.rope_theta, m.decoder.tie_embeddings, m.decoder.norm_eps) == (1e6, False,
                                                                                  1e-6)
  assert m.image_token_id == GQA["vocab_size"] - 1 and m.decoder.vocab_size == 96
  assert cfg.data.seq_len == 80 and cfg.model.dtype == "float32"  # the preset keeps the rest
  printed = capsys.readouterr().out
  assert f"config from {folder}/config.json:" in printed and "model.decoder.heads=6" in printed
  compare_llava(ref, cfg, m.vision.tokens_per_image)


def test_the_published_llava_hf_layout_with_a_sparse_config(tmp_path):
  """llava-hf's config.json names only what differs from LlamaConfig / CLIPVisionConfig, and
  its weights use the 4.x key layout (language_model.model.*)."""
  ref, folder = llava_folder(tmp_path, strategy="default", layer=-2)
  path = os.path.join(folder, "config.json")
  full = json.load(open(path))
  text_defaults = transformers.LlamaConfig().to_dict()
  sparse = {k: v for k, v in full.items() if k != "text_config"}
  sparse["text_config"] = {k: v for k, v in full["text_config"].items()
                           if k in ("model_type",) or text_defaults.get(k) != v}
  json.dump(sparse, open(path, "w"))
  cfg = resolve([f"--config.init.llava_from_hf={folder}"])
  assert cfg.model.vision.feature_select == "patch" and cfg.model.decoder.kv_heads == 2
  compare_llava(ref, cfg, cfg.model.vision.tokens_per_image)


def test_a_siglip_llava_with_tied_embeddings(tmp_path):
  ref, folder = llava_folder(tmp_path, vision="siglip", layer=-1, tie=True)
  cfg = resolve([f"--config.init.llava_from_hf={folder}"])
  assert cfg.model.vision.kind == "siglip" and cfg.model.decoder.tie_embeddings
  assert cfg.model.vision.mean == (0.5, 0.5, 0.5)  # SigLIP's processor, not CLIP's
  compare_llava(ref, cfg, cfg.model.vision.tokens_per_image)


def test_an_override_that_contradicts_the_folder_names_both(tmp_path):
  _, folder = llava_folder(tmp_path)
  with pytest.raises(ConfigError, match=r"config\.model\.decoder\.width: 256 on the command "
                     r"line, 48 in .*config\.json \(text_config\.hidden_size\)"):
    resolve([f"--config.init.llava_from_hf={folder}", "--config.model.decoder.width=256"])
  # Agreeing with the folder is no error; a non-shape override is the user's.
  cfg = resolve([f"--config.init.llava_from_hf={folder}", "--config.model.decoder.width=48",
                 "--config.model.remat=full"])
  assert cfg.model.decoder.width == 48 and cfg.model.remat == "full"


# ----------------------------------------------------------------------------- stage 1


def test_stage_one_from_a_clip_and_a_phi_folder(tmp_path):
  """vision_from_hf + decoder_from_hf: CLIP tower and Phi (partial rotary, biases); the
  projector is new (random), so the check is the towers' and decoder's shapes and that
  every folder tensor lands (load_model refuses a mismatch)."""
  clip = hf_model(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**VISION))
  phi = hf_model(transformers.PhiForCausalLM, transformers.PhiConfig(
      vocab_size=80, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, partial_rotary_factor=0.4, layer_norm_eps=1e-5))
  cv, ph = save_hf(clip, tmp_path / "clip"), save_hf(phi, tmp_path / "phi")
  cfg = resolve(["--config=configs/llava.py:tiny,stage=pretrain",
                 f"--config.init.vision_from_hf={cv}", f"--config.init.decoder_from_hf={ph}"])
  d = cfg.model.decoder
  assert (d.family, d.rotary_dims, d.width, d.vocab_size) == ("phi", 4, 40, 80)
  assert cfg.model.vision.depth == 3 and cfg.model.vision.feature_layer == -1  # the preset's
  mesh = sharding.make_mesh(cfg.mesh)
  model = hf.load_model(cfg, mesh)
  tokens = np.random.default_rng(0).integers(0, 80, (1, 7))
  with torch.no_grad():
    want = phi(torch.from_numpy(tokens)).logits.numpy()
  with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
    got = jax.device_get(nnx.jit(lambda m, t: m.decoder(m.decoder.embed(t), jnp.arange(7)[None],
                                                        jnp.ones_like(t)))(model,
                                                                         jnp.asarray(tokens)))
  assert_close(got, want, "phi logits")


# ----------------------------------------------------------------------------- video, audio


def test_a_llava_next_video_folder(tmp_path):
  frames = 3
  tc = transformers.LlamaConfig(**GQA).to_dict()
  config = transformers.LlavaNextVideoConfig(
      vision_config=transformers.CLIPVisionConfig(**VISION).to_dict(), text_config=tc,
      image_token_index=95, video_token_index=94, vision_feature_layer=-2,
      vision_feature_select_strategy="default", spatial_pool_mode="average",
      spatial_pool_stride=2, image_grid_pinpoints=[[IMAGE, IMAGE]])
  ref = hf_model(transformers.LlavaNextVideoForConditionalGeneration, config)
  folder = save_hf(ref, tmp_path / "next_video")
  cfg = resolve([f"--config.init.llava_from_hf={folder}",
                 f"--config.model.video.num_frames={frames}"])
  m = cfg.model
  assert (m.modalities, m.video_token_id, m.video.pool, m.video.projector) == (
      ("video",), 94, 2, "shared")
  mesh = sharding.make_mesh(cfg.mesh)
  model = hf.load_model(cfg, mesh)
  per_video = m.video.tokens_per_video(m.vision)
  rng = np.random.default_rng(0)
  ids = [*rng.integers(0, 94, 3), *[94] * per_video, *rng.integers(0, 94, 2)]
  pixels = rng.normal(size=(1, frames, 3, IMAGE, IMAGE)).astype(np.float32)
  batch = generate.left_pad([np.array(ids, np.int32)], 0, multiple=1)
  batch.update(video=pixels.transpose(0, 1, 3, 4, 2), video_valid=np.ones((1,), bool))
  with torch.no_grad():
    want = ref(input_ids=torch.tensor([ids]),
               pixel_values_videos=torch.from_numpy(pixels)).logits.numpy()
  with jax.set_mesh(mesh):
    got = ours_logits(model, batch)
  assert_close(got, want, "llava-next-video logits")


def test_a_whisper_folder_sets_the_audio_tower(tmp_path, capsys):
  whisper = hf_model(transformers.WhisperModel, transformers.WhisperConfig(
      num_mel_bins=80, d_model=48, encoder_layers=3, encoder_attention_heads=4,
      encoder_ffn_dim=96, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=32,
      max_source_positions=50, max_target_positions=16, vocab_size=64,
      pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=3,
      suppress_tokens=None, begin_suppress_tokens=None))
  table = whisper.encoder.embed_positions.weight
  with torch.no_grad():  # hf_model randomized this table too; Whisper's are sinusoids
    table.copy_(transformers.models.whisper.modeling_whisper.sinusoids(*table.shape))
  folder = save_hf(whisper, tmp_path / "whisper")
  cfg = resolve(["--config=configs/mimo.py:tiny", f"--config.init.audio_from_hf={folder}"])
  a = cfg.model.audio
  assert (a.width, a.depth, a.heads, a.mlp_dim, a.max_source_positions) == (48, 3, 4, 96, 50)
  assert a.pool == 2 and a.projector == "mlp"  # Whisper has neither: the preset's
  assert "model.audio.width=48" in capsys.readouterr().out
  hf.load_model(cfg, sharding.make_mesh(cfg.mesh))  # every encoder tensor fits


# ----------------------------------------------------------------------------- tokenizer


def test_a_tokenizer_sets_the_placeholder_ids_and_vocabulary(tmp_path):
  from mm_jax.data import export

  path = str(tmp_path / "tok.json")
  export.train_tokenizer(path, ["a cat sat on the mat", "what shape is it"] * 20,
                         vocab_size=60)
  from mm_jax.data import text

  tok = text.load_tokenizer(path)
  cfg = resolve(["--config.data.source=llava_json", f"--config.data.tokenizer={path}",
                 "--config.data.json=x.json", "--config.data.image_dir=."])
  assert cfg.model.image_token_id == tok.tag_id(text.IMAGE_TAG)
  assert cfg.model.decoder.vocab_size == tok.vocab_size
  # Given on the command line, they are the user's (the pipeline checks them).
  cfg = resolve(["--config.data.source=llava_json", f"--config.data.tokenizer={path}",
                 "--config.data.json=x.json", "--config.data.image_dir=.",
                 "--config.model.decoder.vocab_size=500"])
  assert cfg.model.decoder.vocab_size == 500
