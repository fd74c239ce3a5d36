"""config.init.audio_from_hf: a Whisper folder checked against the preset's audio tower and
streamed into towers/audio of a sharded (abstract) train state."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import mimo_config
from flax import nnx
from hf_models import hf_model, save_hf, state_dict, torch, transformers

from mm_jax import sharding
from mm_jax.config import ConfigError
from mm_jax.interop import audio_mapping as am
from mm_jax.interop import hf_import
from mm_jax.interop import hf_mapping as hm
from mm_jax.interop import safetensors_io as sio
from mm_jax.train import state as state_lib
from mm_jax.train.checkpoint import restore_target

MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
# The encoder of configs/mimo.py:tiny (width 64, 2 layers, 4 heads, 100 positions).
WHISPER = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
               max_source_positions=100, num_mel_bins=80, decoder_layers=1,
               decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=64,
               max_target_positions=16, pad_token_id=1, bos_token_id=0, eos_token_id=2,
               decoder_start_token_id=3)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
  """A saved WhisperModel (`encoder.*` and `decoder.*`) with Whisper's sinusoid table."""
  model = hf_model(transformers.WhisperModel, transformers.WhisperConfig(**WHISPER))
  table = model.encoder.embed_positions.weight
  with torch.no_grad():  # randomize() drew this table too; restore transformers' sinusoids
    table.copy_(transformers.models.whisper.modeling_whisper.sinusoids(*table.shape))
  return save_hf(model, tmp_path_factory.mktemp("whisper")), state_dict(model)


def rewritten(folder, out, edit) -> str:
  """A copy of `folder` (config.json too) whose tensors went through `edit(dict) -> dict`."""
  st = sio.SafetensorsFolder(folder)
  sio.save(str(out), edit({k: np.asarray(st.get(k)) for k in st.keys()}))
  (out / "config.json").write_text(open(f"{folder}/config.json").read())
  return str(out)


LAYOUTS = {
    "whisper_model": lambda sd: sd,
    # WhisperForConditionalGeneration: everything under model., plus the output projection.
    "generation": lambda sd: {**{f"model.{k}": v for k, v in sd.items()},
                              "proj_out.weight": sd["decoder.embed_tokens.weight"]},
    "bare_encoder": lambda sd: {k.removeprefix("encoder."): v for k, v in sd.items()
                                if k.startswith("encoder.")},
}


@pytest.fixture(scope="module")
def built():
  cfg = mimo_config(**MESH, **{"optim.freeze": (r"^towers/",)})
  return cfg, state_lib.build(cfg, sharding.make_mesh(cfg.mesh))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_whisper_encoder_streams_into_towers_audio(whisper_dir, built, layout, tmp_path):
  """Every layout gives audio_mapping's in-memory conversion, in the train state's
  shardings; the decoder half is not read and nothing else is touched."""
  folder, sd = whisper_dir
  folder = folder if layout == "whisper_model" else rewritten(folder, tmp_path, LAYOUTS[layout])
  cfg, b = built
  assert cfg.model.audio.pool == 2  # ours, not Whisper's: comes from the preset unchecked
  init = dataclasses.replace(cfg.init, audio_from_hf=folder)
  target = restore_target(b.abstract, b.shardings)
  params, frozen = hf_import.init_from_hf(init, cfg.model, [target.params, target.frozen])
  want = am.audio_to_mm(sd, cfg.model.audio, ("towers", "audio"))
  shardings = {**dict(nnx.to_flat_state(b.shardings.params)),
               **dict(nnx.to_flat_state(b.shardings.frozen))}
  split = 0
  for path, var in [*nnx.to_flat_state(params), *nnx.to_flat_state(frozen)]:
    x = var.get_value()
    if path[:2] != ("towers", "audio"):
      assert isinstance(x, jax.ShapeDtypeStruct), hm.path_str(path)
      continue
    assert x.sharding == shardings[path].get_value() and x.dtype == np.float32, path
    split += not x.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(x), want.pop(path), err_msg=hm.path_str(path))
  assert not want and split > 5  # every encoder tensor used; really sharded
  assert {r.path for r in hf_import.sources(init, cfg.model)[0].rules} == \
      set(am.audio_to_mm(sd, cfg.model.audio, ("towers", "audio")))


@pytest.mark.parametrize("key,value,message", [
    ("model.audio.width", 32, r"^config.model.audio.width: 32 in the preset, 64 in "
     r".*/config.json \(d_model\)$"),
    ("model.audio.depth", 3, r"config.model.audio.depth: 3 .* \(encoder_layers\)"),
    ("model.audio.n_mels", 128, r"config.model.audio.n_mels: 128 .* \(num_mel_bins\)"),
    ("model.audio.max_source_positions", 50, r"\(max_source_positions\)"),
    ("model.audio.layer_norm_eps", 1e-6, r"layer_norm_eps: 1e-06 in the preset, 1e-05 .*"
     r"nn.LayerNorm default"),
])
def test_audio_mismatch_names_the_field(whisper_dir, key, value, message):
  cfg = mimo_config(**{key: value, "init.audio_from_hf": whisper_dir[0]})
  with pytest.raises(ConfigError, match=message):
    hf_import.sources(cfg.init, cfg.model)


def test_audio_needs_the_modality_and_a_whisper_folder(whisper_dir, tmp_path):
  folder = whisper_dir[0]
  with pytest.raises(ConfigError, match=r"^config.init.audio_from_hf: needs 'audio' in "
                     r"config.model.modalities \(got \('video',\)\)"):
    mimo_config(**{"model.modalities": ("video",), "init.audio_from_hf": folder})
  cfg = mimo_config()
  no_audio = dataclasses.replace(cfg.model, modalities=("video",))
  with pytest.raises(ConfigError, match="config.init.audio_from_hf: needs 'audio'"):
    hf_import.audio_source(folder, no_audio)
  raw = json.load(open(f"{folder}/config.json"))
  (tmp_path / "config.json").write_text(json.dumps(raw | {"model_type": "llama"}))
  with pytest.raises(ConfigError, match=r"audio_from_hf: .* model_type 'llama', expected one "
                     r"of \('whisper',\)"):
    hf_import.audio_source(str(tmp_path), cfg.model)
  # A sparse config.json (only non-default keys) completes to WhisperConfig's defaults.
  ref = transformers.WhisperConfig().to_dict()
  for k, v in hf_import.complete({}, "whisper").items():
    assert k == "model_type" or ref[k] == v, k


def test_audio_positions_checked_and_unused_tensors_refused(whisper_dir, tmp_path):
  folder, _ = whisper_dir
  model = mimo_config().model
  table = "encoder.embed_positions.weight"
  cases = [
      (lambda sd: {**sd, table: sd[table] + 0.01},
       r"encoder.embed_positions.weight in .*model.safetensors: embed_positions.weight "
       r"differs from Whisper's sinusoids"),
      (lambda sd: {k: v for k, v in sd.items() if k != table},
       r"tensor 'embed_positions.weight' is missing"),
      (lambda sd: {**sd, "encoder.extra.weight": np.zeros(2, np.float32)},
       r"encoder.extra.weight in .*: no parameter of the model takes it"),
      (lambda sd: {**sd, "encoder.conv1.weight": sd["encoder.conv1.weight"][:, :40]},
       r"encoder.conv1.weight in .*: shape \(64, 40, 3\)"),
  ]
  for i, (edit, message) in enumerate(cases):
    src = hf_import.audio_source(rewritten(folder, tmp_path / str(i), edit), model)
    with pytest.raises(ValueError, match=message):
      list(hf_import.tensors(src))
