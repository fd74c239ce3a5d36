"""config.init: HF folders checked against the preset and streamed into sharded state."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from hf_models import (
  TEXT,
  VISION,
  config_like,
  hf_model,
  llava_hf,
  save_hf,
  state_dict,
  torch,
  transformers,
)

from mm_jax import sharding
from mm_jax.config import ConfigError, ModelConfig
from mm_jax.interop import hf_config as hc
from mm_jax.interop import hf_import
from mm_jax.interop import hf_mapping as hm
from mm_jax.interop import safetensors_io as sio
from mm_jax.train import state as state_lib
from mm_jax.train.checkpoint import restore_target

MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def leaves(state) -> dict:
  return dict(nnx.to_flat_state(state))


def tower_and_decoder(tmp_path):
  """A CLIPVisionModel folder (float32) and a LlamaForCausalLM folder saved in bfloat16."""
  vision = hf_model(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**VISION))
  llama = hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TEXT))
  llama = llama.to(torch.bfloat16)
  return (save_hf(vision, tmp_path / "clip"), state_dict(vision),
          save_hf(llama, tmp_path / "llama"),
          {k: v.float().numpy() for k, v in llama.state_dict().items()})


def test_vision_and_decoder_folders_stream_into_their_shardings(tmp_path):
  """Abstract trees (ShapeDtypeStructs with shardings, as a train state's): covered leaves
  become sharded arrays equal to hf_mapping's in-memory conversion; the projector is left."""
  clip_dir, clip_sd, llama_dir, llama_sd = tower_and_decoder(tmp_path)
  read = lambda folder: json.load(open(f"{folder}/config.json"))
  model_cfg = ModelConfig(vision=hc.vision_config_from_hf(read(clip_dir)),
                          decoder=hc.decoder_config_from_hf(read(llama_dir)),
                          image_token_id=TEXT["vocab_size"])
  cfg = config_like(model_cfg, **MESH, **{"init.vision_from_hf": clip_dir,
                                          "init.decoder_from_hf": llama_dir,
                                          "optim.freeze": (r"^towers/",)})
  built = state_lib.build(cfg, sharding.make_mesh(cfg.mesh))
  target = restore_target(built.abstract, built.shardings)
  params, frozen = hf_import.init_from_hf(cfg.init, cfg.model, [target.params, target.frozen])
  want = {**hm.vision_to_mm(clip_sd, cfg.model.vision, ("towers", "image")),
          **hm.decoder_to_mm(llama_sd, cfg.model.decoder, ("decoder",))}
  got = {**leaves(params), **leaves(frozen)}
  shardings = {**leaves(built.shardings.params), **leaves(built.shardings.frozen)}
  assert {p for p in got if p[0] == "towers"} == set(leaves(frozen))
  split = 0
  for path, var in got.items():
    x = var.get_value()
    if path[0] == "projectors":
      assert isinstance(x, jax.ShapeDtypeStruct), hm.path_str(path)
      continue
    assert x.sharding == shardings[path].get_value() and x.dtype == np.float32, path
    split += not x.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(x), want.pop(path), err_msg=hm.path_str(path))
  assert not want and split > 10  # every HF tensor used; really sharded over fsdp / tensor


def test_full_clip_and_siglip_model_folders_give_their_vision_half(tmp_path):
  text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4)
  for kind, cls, conf in (("clip", transformers.CLIPModel, transformers.CLIPConfig),
                          ("siglip", transformers.SiglipModel, transformers.SiglipConfig)):
    ref = hf_model(cls, conf(vision_config=VISION, text_config=text))
    folder = save_hf(ref, tmp_path / kind)
    vision = hc.vision_config_from_hf(ref.config.vision_config.to_dict())
    src = hf_import.vision_source(folder, ModelConfig(vision=vision))
    got = {p: x for p, _, x in hf_import.tensors(src)}
    sd = {k: v for k, v in state_dict(ref).items() if k.startswith("vision_model.")}
    want = hm.vision_to_mm(sd, vision, ("towers", "image"))
    assert got.keys() == want.keys(), kind
    for p in want:
      np.testing.assert_array_equal(got[p], want[p], err_msg=f"{kind} {hm.path_str(p)}")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
  ref = llava_hf("clip", "default")
  return save_hf(ref, tmp_path_factory.mktemp("llava"), max_shard_size="100KB"), ref


def llava_cfg(ref, **overrides):
  return config_like(hc.model_config_from_hf_llava(ref.config.to_dict()), **overrides)


@pytest.mark.parametrize("key,value,message", [
    ("model.decoder.width", 48, r"config.model.decoder.width: 48 in the preset, 32 in "
     r".*config.json \(text_config.hidden_size\)"),
    ("model.vision.feature_layer", -1, r"config.model.vision.feature_layer: -1 .* "
     r"\(vision_feature_layer\)"),
    ("model.decoder.rope_theta", 10000.0, r"rope_parameters.rope_theta"),
    ("model.image_token_id", 64, r"config.model.image_token_id: 64 .*image_token_index"),
    ("model.projector.kind", "linear", r"config.model.projector.kind"),
])
def test_llava_shape_mismatch_names_the_field(llava_dir, key, value, message):
  folder, ref = llava_dir
  cfg = llava_cfg(ref, **{key: value, "init.llava_from_hf": folder})
  with pytest.raises(ConfigError, match=message):
    hf_import.sources(cfg.init, cfg.model)


def test_decoder_mismatch_names_the_field(tmp_path):
  _, _, llama_dir, _ = tower_and_decoder(tmp_path)
  cfg = tiny_config(**{"init.decoder_from_hf": llama_dir})
  with pytest.raises(ConfigError, match=r"config.model.decoder.vocab_size: 128 in the preset, "
                     r"64 in .*llama/config.json \(vocab_size\)"):
    hf_import.sources(cfg.init, cfg.model)


def rewritten(folder, tmp_path, edit) -> str:
  """A copy of `folder` whose tensors went through `edit(dict) -> dict`."""
  st = sio.SafetensorsFolder(folder)
  sio.save(str(tmp_path), edit({k: np.asarray(st.get(k)) for k in st.keys()}))
  (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
  return str(tmp_path)


def test_missing_unused_and_misshapen_tensors_are_named(llava_dir, tmp_path):
  folder, ref = llava_dir
  cfg = llava_cfg(ref)
  gone = "language_model.model.layers.1.mlp.up_proj.weight"
  cases = [
      (lambda sd: {k: v for k, v in sd.items() if k != gone},
       r"'model.language_model.layers.1.mlp.up_proj.weight' \(for decoder/layers/1/up/kernel"),
      (lambda sd: {**sd, "language_model.model.extra.weight": np.zeros(2, np.float32)},
       r"language_model.model.extra.weight in .*model.safetensors: no parameter"),
      (lambda sd: {**sd, gone: sd[gone][:, :3]}, r"up_proj.weight in .*: shape \(64, 3\)"),
  ]
  for i, (edit, message) in enumerate(cases):
    src = hf_import.llava_source(rewritten(folder, tmp_path / str(i), edit), cfg.model)
    with pytest.raises(ValueError, match=message):
      list(hf_import.tensors(src))


def test_pickle_only_folder_is_refused(llava_dir, tmp_path):
  folder, ref = llava_dir
  (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
  (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
  cfg = llava_cfg(ref, **{"init.llava_from_hf": str(tmp_path)})
  with pytest.raises(FileNotFoundError, match="safetensors only"):
    hf_import.init_from_hf(cfg.init, cfg.model, [])


def test_sparse_published_configs_complete_like_transformers():
  # llava-hf/llava-1.5-7b-hf's config.json names only what differs from the defaults.
  sparse = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": 32000, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "text_config": {"model_type": "llama", "rms_norm_eps": 1e-5, "vocab_size": 32064,
                            "max_position_embeddings": 4096},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024,
                              "image_size": 336, "intermediate_size": 4096, "patch_size": 14,
                              "num_attention_heads": 16, "num_hidden_layers": 24}}
  ours = hc.model_config_from_hf_llava(hf_import.complete(sparse))
  theirs = hc.model_config_from_hf_llava(transformers.LlavaConfig(**sparse).to_dict())
  assert ours == theirs and ours.decoder.width == 4096 and ours.vision.width == 1024
  assert hc.model_config_from_hf_llava(hf_import.complete({"model_type": "llava"})) == \
      hc.model_config_from_hf_llava(transformers.LlavaConfig().to_dict())
  for kind, cls in (("llama", transformers.LlamaConfig), ("mistral", transformers.MistralConfig),
                    ("clip_vision_model", transformers.CLIPVisionConfig),
                    ("siglip_vision_model", transformers.SiglipVisionConfig)):
    ref = cls().to_dict()
    for key, value in hf_import.complete({}, kind).items():
      if key == "rope_theta":
        assert value == ref["rope_parameters"]["rope_theta"], kind
      elif key != "model_type":
        assert ref[key] == value, (kind, key)


def test_init_config_validation_and_tokenizer_default(tmp_path):
  with pytest.raises(ConfigError, match="config.init.llava_from_hf"):
    tiny_config(**{"init.llava_from_hf": "/a", "init.decoder_from_hf": "/b"})
  assert tiny_config(**{"init.decoder_from_hf": str(tmp_path)}).data.tokenizer == ""
  (tmp_path / "tokenizer.json").write_text("{}")
  assert tiny_config(**{"init.decoder_from_hf": str(tmp_path)}).data.tokenizer == str(tmp_path)
  assert tiny_config(**{"init.decoder_from_hf": str(tmp_path),
                        "data.tokenizer": "/t"}).data.tokenizer == "/t"


@pytest.mark.parametrize("qtype", ["nf4"])
def test_qlora_base_from_hf_is_quantised_kernel_by_kernel(llava_dir, qtype):
  """config.init + a quantised base: the folder's float kernels are read into the float
  twin, then quantised; codes equal quantising the float import, the rest is unchanged."""
  from mm_jax.models import quant

  folder, ref = llava_dir
  over = {"init.llava_from_hf": folder, "lora.rank": 4, "lora.base_qtype": qtype,
          "lora.block_size": 16, "optim.freeze": (r"^towers/", r"^decoder/")}
  cfg = llava_cfg(ref, **over)
  float_cfg = llava_cfg(ref, **{**over, "lora.base_qtype": "none"})
  mesh = sharding.make_mesh(cfg.mesh)
  q = leaves(state_lib.initialise(state_lib.build(cfg, mesh), cfg).frozen)
  f = leaves(state_lib.initialise(state_lib.build(float_cfg, mesh), float_cfg).frozen)
  code = quant.code_name(qtype)
  assert ("decoder", "layers", 0, "q", code) in q and ("decoder", "layers", 0, "q", "kernel") in f
  for path, var in q.items():
    if path[-1] == "kernel_scale":
      continue
    if path[-1] == code:
      kernel = f[path[:-1] + ("kernel",)][...]
      want, scales = quant.quantize(kernel, kernel.ndim - var.ndim + 1, qtype, 16)
      np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(want), err_msg=str(path))
      np.testing.assert_array_equal(np.asarray(q[path[:-1] + ("kernel_scale",)][...]),
                                    np.asarray(scales))
    else:
      np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(f[path][...]), str(path))
