"""LoRA export: a run's merged weights (transformers) and its adapters alone (peft over the
HF base) give our model's logits within 1e-4; what neither format expresses is refused."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import (
  assert_close,
  hf_model,
  llava_batch,
  llava_hf,
  save_hf,
  state_dict,
  strict_load,
  torch,
  transformers,
)
from test_hf_import import llava_cfg
from test_hf_parity import abstract, run, run_decoder
from test_phi_parity import PHI_TEXT

from mm_jax import sharding
from mm_jax.config import ConfigError, LoraConfig
from mm_jax.interop import hf, hf_export, peft_export
from mm_jax.interop import hf_config as hc
from mm_jax.interop import hf_mapping as hm
from mm_jax.interop import safetensors_io as sio
from mm_jax.models import lora
from mm_jax.models.decoder import Decoder
from mm_jax.models.layers import Dense
from mm_jax.models.multimodal import MultimodalModel
from mm_jax.train import workdir as workdir_lib

peft = pytest.importorskip("peft")

TOL = 1e-4
RANK, ALPHA = 4, 8.0
# Every decoder projection, and a vision layer's q and out projections (Linear in HF too).
TARGETS = (r"^decoder/layers/\d+/(q|k|v|o|gate|up|down)$", r"^towers/image/blocks/1/(q|o)$")
LORA = {"lora.rank": RANK, "lora.alpha": ALPHA, "lora.targets": TARGETS}
# As stage finetune_lora: the projector trains, so PEFT must carry it as modules_to_save.
FREEZE = {"optim.freeze": (r"^towers/", r"^decoder/")}


def randomize_adapters(model, seed: int = 0) -> None:
  """B ~ N(0, 0.1) on every adapter: B starts at 0, which would hide any mapping error."""
  rng = np.random.default_rng(seed)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, Dense) and m.lora_b is not None:
      m.lora_b[...] = jnp.asarray(0.1 * rng.standard_normal(m.lora_b.shape), jnp.float32)


def hf_logits(model, tokens, pixels=None) -> np.ndarray:
  kw = {} if pixels is None else {"pixel_values": torch.from_numpy(pixels)}
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens), **kw).logits.numpy()


def assert_adapters_matter(base: np.ndarray, ours: np.ndarray) -> None:
  """The adapters move the logits far beyond the tolerance: a dropped one would fail."""
  assert np.abs(base - ours).max() > 100 * TOL * np.abs(ours).max()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_cli_exports_merged_weights_and_peft_adapters_of_a_lora_run(tmp_path, monkeypatch,
                                                                    scan):
  """scanned: model.scan_layers, adapters stacked [L, ...] (a stack adapts all its layers
  or none, so every vision block is a target) and exported layer by layer."""
  ref = llava_hf("clip", "default")
  folder = save_hf(ref, tmp_path / "hf")
  blocks = r"\d+" if scan else "1"
  targets = (TARGETS[0], rf"^towers/image/blocks/{blocks}/(q|o)$")
  cfg = llava_cfg(ref, **{**LORA, **FREEZE, "init.llava_from_hf": folder,
                          "lora.targets": targets, "model.scan_layers": scan})
  model = lora.apply(hf.load_model(cfg, sharding.make_mesh(cfg.mesh)), cfg.lora, 0)
  randomize_adapters(model)
  model.projectors["image"].fc1.bias[...] += 0.5  # the projector trained too
  tokens, pixels, batch = llava_batch("two_one", cfg.model.vision.tokens_per_image)
  ours = run(lambda m, b: m(b), model, batch)

  # The CLI around restore_model is under test, not LoRA checkpoints: stand the restore in.
  workdir, out, adapters = (str(tmp_path / d) for d in ("run", "out", "peft"))
  workdir_lib.write_config(cfg, workdir)
  monkeypatch.setattr(hf, "restore_model", lambda c, w, step=None: (model, 1))
  hf.main(["export", f"--workdir={workdir}", f"--out={out}", f"--peft_out={adapters}"])

  merged = strict_load(transformers.LlavaForConditionalGeneration, out)
  assert_close(hf_logits(merged, tokens, pixels), ours, "merged export logits", TOL)

  base = transformers.LlavaForConditionalGeneration.from_pretrained(folder).float().eval()
  assert_adapters_matter(hf_logits(base, tokens, pixels), ours)
  tuned = peft.PeftModel.from_pretrained(base, adapters).eval()
  assert_close(hf_logits(tuned, tokens, pixels), ours, "peft logits", TOL)

  config = json.load(open(os.path.join(adapters, peft_export.CONFIG)))
  layers = [f"model.language_model.layers.{i}.{m}" for i in range(2)
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
  vision = [f"model.vision_tower.encoder.layers.{i}.self_attn.{m}" for m in ("q_proj", "out_proj")
            for i in (range(cfg.model.vision.depth) if scan else [1])]
  assert config["target_modules"] == sorted(layers + vision)
  assert config["modules_to_save"] == ["model.multi_modal_projector.linear_1",
                                       "model.multi_modal_projector.linear_2"]
  assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, folder)
  st = sio.SafetensorsFile(os.path.join(adapters, peft_export.WEIGHTS))
  at = "base_model.model.model.language_model.layers.0.self_attn."
  assert st.get(at + "q_proj.lora_A.weight").shape == (RANK, 32)  # [r, D]
  assert st.get(at + "k_proj.lora_B.weight").shape == (16, RANK)  # [K*H, r] from [r, K, H]
  assert st.get(at + "o_proj.lora_A.weight").shape == (RANK, 32)  # [r, N*H] from [N, H, r]
  assert st.get("base_model.model.model.multi_modal_projector.linear_1.bias").shape == (32,)


def test_phi_adapters_load_into_peft_over_phi_for_causal_lm(tmp_path):
  """A bare Phi decoder (module paths "layers/3/q"): dense, fc1/fc2 and the biased lm_head,
  partial rotary; the LLaMA mapping is covered through LLaVA above."""
  ref = hf_model(transformers.PhiForCausalLM, transformers.PhiConfig(**PHI_TEXT))
  cfg = hc.decoder_config_from_hf(ref.config.to_dict())
  decoder = abstract(Decoder, cfg)
  hm.load_flat_into(decoder, hm.decoder_to_mm(state_dict(ref), cfg))
  lora_cfg = LoraConfig(rank=RANK, alpha=ALPHA,
                        targets=(r"^layers/\d+/(q|k|v|o|fc1|fc2)$", r"^lm_head$"))
  randomize_adapters(lora.apply(decoder, lora_cfg, seed=0))
  tokens = np.random.default_rng(0).integers(0, PHI_TEXT["vocab_size"], (2, 9))
  ours = run_decoder(decoder, tokens)
  assert_adapters_matter(hf_logits(ref, tokens), ours)

  peft_export.export_decoder(decoder, cfg, lora_cfg, str(tmp_path))
  tuned = peft.PeftModel.from_pretrained(ref, str(tmp_path)).eval()
  assert_close(hf_logits(tuned, tokens), ours, "phi peft logits", TOL)


def _abstract_lora_model(cfg):
  return nnx.eval_shape(lambda: lora.apply(MultimodalModel(cfg.model, rngs=nnx.Rngs(0)),
                                           cfg.lora, 0))


@pytest.mark.parametrize("overrides,error,message", [
    ({"lora.targets": (r"^towers/image/patch$",)}, ConfigError,
     r"config.lora.targets: towers/image/patch has an adapter but .*patch_embedding.weight "
     r"is not a Linear"),
    ({"lora.targets": (r"^projectors/image/fc1$",), **FREEZE}, ConfigError,
     r"config.optim.freeze: model.multi_modal_projector.linear_1 has an adapter and trained"),
])
def test_peft_export_refuses_what_peft_cannot_express(tmp_path, tiny, overrides, error,
                                                       message):
  cfg = tiny(**{**LORA, **overrides})
  with pytest.raises(error, match=message):
    peft_export.export_llava(_abstract_lora_model(cfg), cfg, str(tmp_path))


def test_export_refuses_unmerged_adapters(tmp_path, tiny):
  cfg = tiny(**LORA)
  with pytest.raises(ValueError, match=r"unmerged LoRA adapters \(decoder/layers/0/down/lora_a"):
    hf_export.export_model(_abstract_lora_model(cfg), cfg, str(tmp_path))


@pytest.mark.parametrize("args,code,message", [
    (["--peft_out=P"], 1, r"config error: config.lora.rank: 0 in .*: the run has no LoRA "
     "adapters"),
    ([], 2, r"error: export needs --out and/or --peft_out"),  # argparse's usage error
])
def test_cli_errors_exit_with_a_message(tmp_path, tiny, capsys, args, code, message):
  workdir_lib.write_config(tiny(), str(tmp_path))
  with pytest.raises(SystemExit) as e:
    hf.main(["export", f"--workdir={tmp_path}", *args])
  assert e.value.code == code
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert re.search(message, err), err
