"""LoRA adapters -> a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) that
`peft.PeftModel.from_pretrained(base, folder)` loads onto the Hugging Face base model.

The base is the model the run started from (e.g. config.init.llava_from_hf): a
LlavaForConditionalGeneration for a MultimodalModel (`export_llava`), a LlamaForCausalLM or
PhiForCausalLM for a bare Decoder (`export_decoder`).

Layout (peft 0.21, transformers 5.x module names, as hf_mapping's 5.x keys without
".weight"): for each adapted Linear MODULE, e.g. model.language_model.layers.0.self_attn.q_proj,
  base_model.model.MODULE.lora_A.weight  float[r, in_features]
  base_model.model.MODULE.lora_B.weight  float[out_features, r]
with W' = W + (lora_alpha / r) B.A. Our A float[*in, r] and B float[r, *out] take the
flattening and transpose hf_mapping gives the kernel float[*in, *out] (a Rule of op "t"
whose in or out dims are r), so q's B [r, N, H] becomes [N*H, r] and o's A [N, H, r]
becomes [r, N*H]. Biases are untouched (bias "none").

Base parameters the run trained besides the adapters (those `config.optim.freeze` leaves
trainable: the projector in stage finetune_lora) differ from the base, so their modules go
in as PEFT `modules_to_save`, full tensors keyed base_model.model.MODULE.PARAM: without
them the adapters alone would not reproduce the run's model. A module that has an adapter
and a trained base cannot be expressed (PEFT wraps a module one way or the other): use the
merged export. Adapters on layers without a Linear counterpart (the patch embedding, a
convolution in HF; audio towers) are refused naming the module.

Module names are transformers 5.x's (tested: 5.24, peft 0.21). 4.x checkpoints spell the
vision tower `vision_tower.vision_model.*`; if its modules are named so too, adapters on
the tower would not load there (decoder and projector names agree). A quantised base
(QLoRA) is not part of the folder: PEFT applies the adapters to the float base, whose
logits differ from the run's by the quantisation error (the merged export has none).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from mm_jax.config import Config, ConfigError, DecoderConfig, LoraConfig
from mm_jax.interop import hf_export, safetensors_io
from mm_jax.interop import hf_mapping as hm
from mm_jax.models import stack
from mm_jax.models.layers import Dense
from mm_jax.train.optim import frozen_filter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model
BASE_FROZEN = ("",)  # a freeze regex matching every path: nothing but the adapters trained
# Tensors with a vocabulary dim first, grown to V' rows as hf_export grows the base.
_GROWN = (*hm.VOCAB_ROWS, "lm_head.lora_B.weight")


def _module(hf_key: str) -> str:
  """'model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj'."""
  return hf_key.rsplit(".", 1)[0]


def _adapters(model: nnx.Module, rules: dict[hm.Path, hm.Rule], lora: LoraConfig
              ) -> dict[str, tuple[hm.Rule, hm.Rule, Dense]]:
  """HF module name -> (rule for A, rule for B, Dense) for every adapted Dense; raises
  ConfigError naming a module without a Linear counterpart."""
  out = {}
  for path, m in nnx.iter_modules(model):
    if not isinstance(m, Dense) or m.lora_a is None:
      continue
    rule = rules.get((*path, "kernel"))
    where = hm.path_str(path)
    if rule is None or rule.op != "t":
      what = "no Hugging Face counterpart" if rule is None else f"{rule.hf} is not a Linear"
      raise ConfigError(f"config.lora.targets: {where} has an adapter but {what}; PEFT "
                        "export takes adapters on Linear layers only (drop it from targets)")
    r = m.lora_a.shape[-1]
    if r != lora.rank or not np.isclose(m.lora_scale, lora.alpha / r, rtol=1e-6):
      # adapter_config holds one r and lora_alpha: every adapter must agree with them.
      raise ValueError(f"{where}: adapter rank {r}, scale {m.lora_scale}; config.lora has "
                       f"rank {lora.rank}, alpha / rank {lora.alpha / lora.rank}")
    n_in, n_out = rule.mm_shape[:m.n_in], rule.mm_shape[m.n_in:]
    # [*in, r] and [r, *out] are kernels of in x r and r x out Linears: the same transform.
    a = hm.Rule(_module(rule.hf) + ".lora_A.weight", (*path, "lora_a"), "t",
                (r, int(np.prod(n_in))), (*n_in, r))
    b = hm.Rule(_module(rule.hf) + ".lora_B.weight", (*path, "lora_b"), "t",
                (rule.hf_shape[0], r), (r, *n_out))
    out[_module(rule.hf)] = (a, b, m)
  if not out:
    raise ConfigError("config.lora.rank: the model has no adapters to export")
  return out


def _saved_modules(model: nnx.Module, rules: Sequence[hm.Rule], freeze: Sequence[str],
                   adapted: Sequence[str]) -> list[str]:
  """HF modules holding base parameters that `freeze` leaves trainable (outermost only)."""
  frozen = frozen_filter(freeze)
  base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  trained = {p for p, v in nnx.to_flat_state(base) if not frozen(p, v)}
  names = sorted({_module(r.hf) for r in rules if r.path in trained})
  names = [n for n in names if not any(n.startswith(o + ".") for o in names)]
  clash = [a for a in adapted for n in names if a == n or a.startswith(n + ".")]
  if clash:
    raise ConfigError(f"config.optim.freeze: {clash[0]} has an adapter and trained base "
                      "weights; PEFT cannot express both: export merged weights instead")
  return names


def _config(lora: LoraConfig, targets: Sequence[str], saved: Sequence[str], base: str) -> dict:
  # peft scales by lora_alpha / r (use_rslora off), as Dense by alpha / rank.
  alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
  return dict(peft_type="LORA", task_type="CAUSAL_LM", r=lora.rank, lora_alpha=alpha,
              lora_dropout=lora.dropout, target_modules=sorted(targets),
              modules_to_save=list(saved) or None, bias="none", fan_in_fan_out=False,
              use_rslora=False, use_dora=False, init_lora_weights=True, inference_mode=True,
              base_model_name_or_path=base or None, revision=None)


def write(model: nnx.Module, rules: Sequence[hm.Rule], lora: LoraConfig, out: str, *,
          freeze: Sequence[str] = BASE_FROZEN, base: str = "", dtype: str = "float32",
          rows: int = 0) -> list[str]:
  """Writes the PEFT folder `out` for `model`'s adapters (HF keys from `rules`); `rows`
  grows the vocabulary dims to the exported V' with zero rows. Returns the files."""
  by_path = {r.path: r for r in rules}
  if stack.stacks(model):  # PEFT names modules per layer: read an unrolled copy's
    model = stack.unroll(nnx.clone(model))
  adapters = _adapters(model, by_path, lora)
  saved = _saved_modules(model, rules, freeze, list(adapters))
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  tensors = {}  # PEFT key -> (rule, array getter)
  for a, b, m in adapters.values():
    tensors[a.hf] = (a, lambda m=m: m.lora_a.get_value())
    tensors[b.hf] = (b, lambda m=m: m.lora_b.get_value())
  for r in rules:
    if any(r.hf.startswith(n + ".") for n in saved):
      tensors[r.hf] = (r, lambda p=r.path: params[p].get_value())
  np_dtype = np.dtype(jax.numpy.dtype(dtype))

  def grown(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (max(rows, shape[0]), *shape[1:]) if key in _GROWN else shape

  def fetch(name: str) -> np.ndarray:
    key = name.removeprefix(PREFIX)
    rule, get = tensors[key]
    x = rule.to_hf(np.asarray(jax.device_get(get()), np.float32))
    pad = grown(key, x.shape)[0] - x.shape[0]
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    return x.astype(np_dtype)

  specs = [(PREFIX + k, grown(k, r.hf_shape), np_dtype) for k, (r, _) in tensors.items()]
  os.makedirs(out, exist_ok=True)
  safetensors_io.write_file(os.path.join(out, WEIGHTS), specs, fetch, metadata={"format": "pt"})
  with open(os.path.join(out, CONFIG), "w") as f:
    json.dump(_config(lora, adapters, saved, base), f, indent=2)
  return [CONFIG, WEIGHTS]


def export_llava(model: nnx.Module, cfg: Config, out: str, *, dtype: str = "") -> list[str]:
  """PEFT folder for a LoRA MultimodalModel over LlavaForConditionalGeneration (the layout
  hf_export writes and transformers 5.x builds); `dtype` defaults to the param dtype."""
  hf_export.check_exportable(cfg.model)
  return write(model, hm.llava_rules(cfg.model), cfg.lora, out, freeze=cfg.optim.freeze,
               base=cfg.init.llava_from_hf, dtype=dtype or cfg.model.param_dtype,
               rows=hm.grown_vocab(cfg.model))


def export_decoder(decoder: nnx.Module, cfg: DecoderConfig, lora: LoraConfig, out: str, *,
                   freeze: Sequence[str] = BASE_FROZEN, base: str = "",
                   dtype: str = "float32") -> list[str]:
  """PEFT folder for a LoRA Decoder (module paths "layers/3/q") over LlamaForCausalLM or
  PhiForCausalLM (after cfg.family); `freeze` as config.optim.freeze over its paths (the
  default: the base did not train)."""
  return write(decoder, hm.decoder_rules(cfg), lora, out, freeze=freeze, base=base,
               dtype=dtype)
