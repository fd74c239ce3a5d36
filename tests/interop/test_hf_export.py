"""HF LLaVA -> config.init -> (checkpoint) -> export -> transformers: same logits, 1e-5."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import mimo_config, tiny_config
from flax import nnx
from hf_models import (
  IMAGE,
  assert_close,
  images_np,
  llava_batch,
  llava_hf,
  save_hf,
  state_dict,
  strict_load,
  torch,
  transformers,
)
from test_hf_import import MESH, leaves, llava_cfg

from mm_jax import sharding
from mm_jax.config import ConfigError
from mm_jax.data import pipeline
from mm_jax.interop import hf, hf_export
from mm_jax.interop import hf_mapping as hm
from mm_jax.interop import safetensors_io as sio
from mm_jax.models import stack
from mm_jax.train import batches
from mm_jax.train import state as state_lib
from mm_jax.train import workdir as workdir_lib
from mm_jax.train.checkpoint import Checkpointer
from mm_jax.train.loop import outputs_note

TOL = 1e-5


def hf_logits(model, tokens: np.ndarray, pixels: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens),
                 pixel_values=torch.from_numpy(pixels)).logits.numpy()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_cli_export_of_a_run_started_from_llava_matches_transformers(tmp_path, scan):
  """scanned: model.scan_layers, the layers imported into [L, ...] stacks, checkpointed in
  that layout and exported back layer by layer."""
  ref = llava_hf("clip", "default")
  folder = save_hf(ref, tmp_path / "hf", max_shard_size="100KB")  # sharded, with an index
  assert os.path.isfile(os.path.join(folder, sio.INDEX))
  cfg = llava_cfg(ref, **{"mesh.data": 1, "mesh.fsdp": 2, "init.llava_from_hf": folder,
                          "checkpoint.async_save": False, "model.scan_layers": scan})
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:2])  # restored onto 8 by the export
  built = state_lib.build(cfg, mesh)
  with jax.set_mesh(mesh):  # what loop.train does when it starts fresh
    state = state_lib.initialise(built, cfg)
  want = hm.llava_to_mm(state_dict(ref), cfg.model)
  shardings = leaves(built.shardings.params)
  for path, var in leaves(state.params).items():
    assert var.get_value().sharding == shardings[path].get_value(), hm.path_str(path)
  got = stack.unstack_flat({p: np.asarray(v.get_value())
                            for p, v in leaves(state.params).items()})
  assert (len(got) > len(leaves(state.params))) == scan  # stacked leaves stand for L layers
  for path, value in got.items():
    np.testing.assert_array_equal(value, want[path], err_msg=hm.path_str(path))

  workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
  workdir_lib.write_config(cfg, workdir)
  data = pipeline.train_iterator(cfg.data, batches.row_spec(cfg), global_batch=8, seed=0)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  ckpt.save(3, state, data)
  ckpt.close()
  hf.main(["export", f"--workdir={workdir}", f"--out={out}", "--max_shard_gb=0.0001"])

  assert os.path.isfile(os.path.join(out, sio.INDEX))
  exported = strict_load(transformers.LlavaForConditionalGeneration, out)
  tokens, pixels, _ = llava_batch("two_one", cfg.model.vision.tokens_per_image)
  assert_close(hf_logits(exported, tokens, pixels), hf_logits(ref, tokens, pixels),
               "exported llava logits", TOL)


def test_export_grows_the_table_for_a_sentinel_image_token(tmp_path):
  """tiny-style image_token_id == V: exported V' = V + 1 with a zero row; logits over the
  first V ids match our model; the WordLevel tokenizer maps <image> to V."""
  vocab = 64
  ref = llava_hf("clip", "full", image_token=vocab)  # never run by HF: V has no row for it
  folder = save_hf(ref, tmp_path / "hf")
  cfg = llava_cfg(ref, **MESH, **{"init.llava_from_hf": folder})
  model = hf.load_model(cfg, sharding.make_mesh(cfg.mesh))
  out = str(tmp_path / "out")
  hf_export.export_model(model, cfg, out)

  tokens, pixels, batch = llava_batch("two_one", cfg.model.vision.tokens_per_image,
                                      image_token=vocab)
  with jax.default_matmul_precision("highest"):
    ours = jax.device_get(nnx.jit(lambda m, b: m(b))(model, batch))
  exported = strict_load(transformers.LlavaForConditionalGeneration, out)
  assert exported.config.text_config.vocab_size == vocab + 1
  theirs = hf_logits(exported, tokens, pixels)
  assert_close(theirs[..., :vocab], ours, "logits over the first V ids", 1e-4)
  np.testing.assert_array_equal(theirs[..., vocab], 0.0)

  tok = transformers.AutoTokenizer.from_pretrained(out)
  words = pipeline.synthetic_tokenizer()
  text = f"{words.words[0]} <image> {words.words[1]}"
  assert tok(text).input_ids == [words.encode(words.words[0])[0], vocab,
                                 words.encode(words.words[1])[0]]
  proc = transformers.AutoProcessor.from_pretrained(out)
  image = (images_np(1)[0].transpose(1, 2, 0) * 40 + 128).clip(0, 255).astype(np.uint8)
  ids = proc(images=image, text="<image> " + words.words[0]).input_ids[0]
  assert list(ids).count(vocab) == cfg.model.vision.tokens_per_image
  config = json.load(open(os.path.join(out, "preprocessor_config.json")))
  assert config["crop_size"] == {"height": IMAGE, "width": IMAGE}

  # Imported back with the same preset (V = 64): the zero row is dropped, nothing else moves.
  back = hf.load_model(llava_cfg(ref, **MESH, **{"init.llava_from_hf": out}),
                       sharding.make_mesh(cfg.mesh))
  want = leaves(nnx.state(model, nnx.Param))
  for path, var in leaves(nnx.state(back, nnx.Param)).items():
    np.testing.assert_array_equal(np.asarray(var.get_value()),
                                  np.asarray(want[path].get_value()), hm.path_str(path))

  half = str(tmp_path / "bf16")
  hf_export.export_model(model, cfg, half, dtype="bfloat16")
  st = sio.SafetensorsFolder(half)
  embed = st.get("language_model.model.embed_tokens.weight")
  assert embed.dtype == ml_dtypes.bfloat16 and embed.shape == (vocab + 1, cfg.model.decoder.width)
  np.testing.assert_array_equal(np.asarray(embed[:vocab], np.float32),
                                state_dict(ref)["model.language_model.embed_tokens.weight"]
                                .astype(ml_dtypes.bfloat16).astype(np.float32))
  assert json.load(open(os.path.join(half, "config.json")))["dtype"] == "bfloat16"


def test_export_refuses_what_llava_cannot_express(tmp_path, tiny):
  cfg = tiny(**{"model.projector.kind": "linear"})
  workdir_lib.write_config(cfg, str(tmp_path))
  with pytest.raises(ConfigError, match="config.model.projector.kind: 'linear'"):
    hf.export(str(tmp_path), str(tmp_path / "out"))


def test_a_model_no_class_holds_is_refused_in_one_line_and_never_offered(tmp_path, capsys):
  cfg = mimo_config()
  workdir_lib.write_config(cfg, str(tmp_path))
  with pytest.raises(SystemExit) as e:
    hf.main(["export", f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}"])
  assert e.value.code == 1  # a config error, as main.py's (docs/reliability.md)
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(
      "config error: config.model.modalities: ('video', 'audio'): no transformers class"), err
  # The run's closing lines offer the export only where it works.
  assert not hf_export.exportable(cfg.model) and hf_export.exportable(tiny_config().model)
  assert "mm_jax.interop.hf export" not in outputs_note("w", 4, True, exportable=False)
  assert outputs_note("w", 4, True).splitlines()[-1] == (
      "  export:     python -m mm_jax.interop.hf export --workdir=w --out=w_hf")


def test_import_refuses_rows_past_the_vocabulary_that_are_not_zero(tmp_path):
  """A folder whose table is V' = image_token_id + 1 only drops the extra row if it is an
  export's zero padding; a trained row means the preset's vocabulary is wrong."""
  vocab = 64
  ref = llava_hf("clip", "full", image_token=vocab)
  with torch.no_grad():  # a real row for the placeholder: the vocabulary is V + 1
    ref.resize_token_embeddings(vocab + 1)
    ref.get_input_embeddings().weight[vocab] = 0.5
  folder = save_hf(ref, tmp_path / "hf")
  cfg = llava_cfg(ref, **MESH, **{"init.llava_from_hf": folder, "model.decoder.vocab_size": vocab})
  with pytest.raises(ValueError, match=r"embed_tokens.weight in .*: row 64 is not zero.*"
                     r"config.model.decoder.vocab_size=65"):
    hf.load_model(cfg, sharding.make_mesh(cfg.mesh))
