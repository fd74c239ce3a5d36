"""Hugging Face <-> mm_jax parameters, pure numpy (no torch import); configs: hf_config.py.

A `Rule` ties one HF tensor to one mm_jax parameter path (as `nnx.to_flat_state` spells it,
e.g. ("towers", "image", "blocks", 0, "q", "kernel")) and says how to convert it; the rule
lists below drive both directions. Shape letters: D width, N heads, K kv heads, H head
size, F mlp width, V vocabulary, P patches (+1 with a class token), p patch size, C = 3.

HF Linear weights are [out, in]; our `Dense` kernels are [*in, *out], so a query weight
[N*H, D] becomes [D, N, H] and an output weight [D, N*H] becomes [N, H, D]; the patch conv
weight [D, C, p, p] becomes [p, p, C, D].

Key layouts: HF state dicts are first renamed to the transformers 5.x layout
(`normalize_keys`), so both the published llava-hf layout (`vision_tower.vision_model.*`,
`language_model.model.*`, `language_model.lm_head.weight`) and the 5.x one
(`model.vision_tower.*`, `model.language_model.*`, `lm_head.weight`) load.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from mm_jax.config import DecoderConfig, ModelConfig, ProjectorConfig, VisionConfig
from mm_jax.interop import hf_config as hc

Path = tuple[str | int, ...]
Flat = dict[Path, np.ndarray]

# ----------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor `hf` [hf_shape] <-> one mm_jax parameter `path` [mm_shape].

  op: "copy" (reshape only), "t" (Linear weight: transpose, then reshape) or "conv"
  (patch conv [D, C, p, p] <-> [p, p, C, D]).
  """

  hf: str
  path: Path
  op: str
  hf_shape: tuple[int, ...]
  mm_shape: tuple[int, ...]

  def to_mm(self, x: np.ndarray) -> np.ndarray:
    x = x.T if self.op == "t" else x.transpose(2, 3, 1, 0) if self.op == "conv" else x
    return np.ascontiguousarray(x.reshape(self.mm_shape))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.op == "t":
      return np.ascontiguousarray(x.reshape(self.hf_shape[::-1]).T)
    if self.op == "conv":
      return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x.reshape(self.hf_shape)


def _linear(hf: str, path: Path, d_in: tuple[int, ...], d_out: tuple[int, ...],
            bias: bool) -> list[Rule]:
  """HF Linear weight [prod(out), prod(in)] (+ bias) <-> Dense kernel [*in, *out] (+ bias)."""
  n_in, n_out = math.prod(d_in), math.prod(d_out)
  rules = [Rule(f"{hf}.weight", (*path, "kernel"), "t", (n_out, n_in), d_in + d_out)]
  if bias:
    rules.append(Rule(f"{hf}.bias", (*path, "bias"), "copy", (n_out,), d_out))
  return rules


def _norm(hf: str, path: Path, d: int, bias: bool) -> list[Rule]:
  """LayerNorm / RMSNorm: weight -> scale (and bias)."""
  rules = [Rule(f"{hf}.weight", (*path, "scale"), "copy", (d,), (d,))]
  if bias:
    rules.append(Rule(f"{hf}.bias", (*path, "bias"), "copy", (d,), (d,)))
  return rules


def vision_rules(cfg: VisionConfig) -> list[Rule]:
  """CLIPVisionModel / SiglipVisionModel (5.x keys, no `vision_model.`) <-> VisionTower."""
  d, n, p, clip = cfg.width, cfg.heads, cfg.patch_size, cfg.kind == "clip"
  nh = (n, d // n)
  rules = [Rule("embeddings.patch_embedding.weight", ("patch", "kernel"), "conv",
                (d, 3, p, p), (p, p, 3, d)),
           Rule("embeddings.position_embedding.weight", ("pos",), "copy",
                (cfg.num_patches + clip, d), (cfg.num_patches + clip, d))]
  if clip:
    rules += [Rule("embeddings.class_embedding", ("cls",), "copy", (d,), (d,)),
              *_norm("pre_layrnorm", ("pre_ln",), d, bias=True)]
  else:
    rules.append(Rule("embeddings.patch_embedding.bias", ("patch", "bias"), "copy", (d,), (d,)))
  for i in range(cfg.depth):
    hf, at = f"encoder.layers.{i}", ("blocks", i)
    rules += [*_norm(f"{hf}.layer_norm1", (*at, "ln1"), d, bias=True),
              *_norm(f"{hf}.layer_norm2", (*at, "ln2"), d, bias=True),
              *_linear(f"{hf}.self_attn.out_proj", (*at, "o"), nh, (d,), bias=True),
              *_linear(f"{hf}.mlp.fc1", (*at, "fc1"), (d,), (cfg.mlp_dim,), bias=True),
              *_linear(f"{hf}.mlp.fc2", (*at, "fc2"), (cfg.mlp_dim,), (d,), bias=True)]
    rules += [r for x in "qkv" for r in _linear(f"{hf}.self_attn.{x}_proj", (*at, x), (d,), nh,
                                                bias=True)]
  return rules + _norm("post_layernorm", ("post_ln",), d, bias=True)


def projector_rules(cfg: ProjectorConfig, d_in: int, d_out: int) -> list[Rule]:
  """LlavaMultiModalProjector (linear_1, gelu, linear_2) <-> Projector (mlp2x_gelu only)."""
  hc.expect(cfg.kind == "mlp2x_gelu", "projector.kind",
          f"{cfg.kind!r} has no Hugging Face LLaVA counterpart (mlp2x_gelu only)")
  return (_linear("linear_1", ("fc1",), (d_in,), (d_out,), bias=True)
          + _linear("linear_2", ("fc2",), (d_out,), (d_out,), bias=True))


def _attention(hf: str, at: Path, cfg: DecoderConfig, out: str) -> list[Rule]:
  """q/k/v/`out` projections of one layer (`hf`: its self_attn prefix)."""
  d, h, bias = cfg.width, cfg.head_size, cfg.attention_bias
  return [*_linear(f"{hf}.q_proj", (*at, "q"), (d,), (cfg.heads, h), bias),
          *_linear(f"{hf}.k_proj", (*at, "k"), (d,), (cfg.kv_heads, h), bias),
          *_linear(f"{hf}.v_proj", (*at, "v"), (d,), (cfg.kv_heads, h), bias),
          *_linear(f"{hf}.{out}", (*at, "o"), (cfg.heads, h), (d,), bias)]


def _lm_head(cfg: DecoderConfig) -> list[Rule]:
  """lm_head weight (unless tied) and bias; a tied head keeps its bias as `lm_bias`."""
  d, v = cfg.width, cfg.vocab_size
  if not cfg.tie_embeddings:
    return _linear("lm_head", ("lm_head",), (d,), (v,), cfg.lm_head_bias)
  return [Rule("lm_head.bias", ("lm_bias",), "copy", (v,), (v,))] if cfg.lm_head_bias else []


def llama_rules(cfg: DecoderConfig) -> list[Rule]:
  """LlamaForCausalLM (`model.*`, `lm_head.weight` unless tied) <-> Decoder."""
  d, f, b = cfg.width, cfg.mlp_dim, cfg.mlp_bias
  v = cfg.vocab_size
  rules = [Rule("model.embed_tokens.weight", ("embedding",), "copy", (v, d), (v, d)),
           *_norm("model.norm", ("norm",), d, bias=False)]
  for i in range(cfg.depth):
    hf, at = f"model.layers.{i}", ("layers", i)
    rules += [*_norm(f"{hf}.input_layernorm", (*at, "attn_norm"), d, bias=False),
              *_norm(f"{hf}.post_attention_layernorm", (*at, "mlp_norm"), d, bias=False),
              *_attention(f"{hf}.self_attn", at, cfg, "o_proj"),
              *_linear(f"{hf}.mlp.gate_proj", (*at, "gate"), (d,), (f,), b),
              *_linear(f"{hf}.mlp.up_proj", (*at, "up"), (d,), (f,), b),
              *_linear(f"{hf}.mlp.down_proj", (*at, "down"), (f,), (d,), b)]
  return rules + _lm_head(cfg)


def phi_rules(cfg: DecoderConfig) -> list[Rule]:
  """PhiForCausalLM (`model.*`, `lm_head.weight` unless tied, `lm_head.bias`) <-> Decoder.

  One LayerNorm per layer (input_layernorm, shared by attention and MLP), `dense` is the
  output projection, `model.final_layernorm` the final norm.
  """
  d, f, v = cfg.width, cfg.mlp_dim, cfg.vocab_size
  rules = [Rule("model.embed_tokens.weight", ("embedding",), "copy", (v, d), (v, d)),
           *_norm("model.final_layernorm", ("norm",), d, bias=True)]
  for i in range(cfg.depth):
    hf, at = f"model.layers.{i}", ("layers", i)
    rules += [*_norm(f"{hf}.input_layernorm", (*at, "attn_norm"), d, bias=True),
              *_attention(f"{hf}.self_attn", at, cfg, "dense"),
              *_linear(f"{hf}.mlp.fc1", (*at, "fc1"), (d,), (f,), bias=True),
              *_linear(f"{hf}.mlp.fc2", (*at, "fc2"), (f,), (d,), bias=True)]
  return rules + _lm_head(cfg)


def decoder_rules(cfg: DecoderConfig) -> list[Rule]:
  """The *ForCausalLM rules of `cfg.family`."""
  return phi_rules(cfg) if cfg.family == "phi" else llama_rules(cfg)


def _prefixed(rules: Sequence[Rule], hf_prefix: str, path: Path, strip: str = "") -> list[Rule]:
  """Rules with `hf_prefix` replacing a leading `strip` of each HF key and `path` prepended."""
  return [dataclasses.replace(r, hf=hf_prefix + r.hf.removeprefix(strip), path=(*path, *r.path))
          for r in rules]


def llava_rules(cfg: ModelConfig) -> list[Rule]:
  """LlavaForConditionalGeneration (5.x keys) <-> MultimodalModel, any decoder family."""
  text = decoder_rules(cfg.decoder)
  body = [r for r in text if r.hf.startswith("model.")]
  head = [r for r in text if not r.hf.startswith("model.")]
  return (_prefixed(vision_rules(cfg.vision), "model.vision_tower.", ("towers", "image"))
          + _prefixed(projector_rules(cfg.projector, cfg.vision.width, cfg.decoder.width),
                      "model.multi_modal_projector.", ("projectors", "image"))
          + _prefixed(body, "model.language_model.", ("decoder",), strip="model.")
          + _prefixed(head, "", ("decoder",)))


# LlavaForConditionalGeneration tensors with the vocabulary first. transformers looks every
# input id up in the table, the placeholder's too, so an export grows them by zero rows to
# grown_vocab when image_token_id lies outside it; an import of such a folder drops them.
VOCAB_ROWS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def grown_vocab(cfg: ModelConfig) -> int:
  """V' = max(V, image_token_id + 1, video_token_id + 1 for a video model): the rows an
  exported table has."""
  ids = [cfg.image_token_id] + ([cfg.video_token_id] if "video" in cfg.modalities else [])
  return max(cfg.decoder.vocab_size, *(i + 1 for i in ids))


# ----------------------------------------------------------------------------- state dicts

# Older layouts -> transformers 5.x keys; the first matching pattern renames a key.
_RENAMES = {
    "vision": ((r"^vision_model\.", ""),),
    "llama": (),
    "phi": (),
    "llava": ((r"^(model\.)?vision_tower\.(vision_model\.)?", "model.vision_tower."),
              (r"^(model\.)?multi_modal_projector\.", "model.multi_modal_projector."),
              (r"^(language_model\.)?lm_head\.", "lm_head."),
              (r"^(model\.language_model|language_model\.model|language_model)\.",
               "model.language_model.")),
    # Whisper: the encoder of a WhisperForConditionalGeneration / WhisperModel -> bare keys.
    "whisper": ((r"^(model\.)?encoder\.", ""),),
}
# Tensors with no mm_jax counterpart: SigLIP's pooling head, buffers of older versions.
_IGNORED = re.compile(r"(^|vision_tower\.)head\.|rotary_emb\.inv_freq$|position_ids$")


def ignored(key: str) -> bool:
  """Whether a (normalised) HF key has no mm_jax counterpart and is skipped on import."""
  return bool(_IGNORED.search(key))


def normalize_keys(sd: Mapping[str, Any], family: str) -> dict[str, Any]:
  """Renames `sd`'s keys to the transformers 5.x layout of `family` (vision|llama|phi|llava|
  whisper)."""
  out: dict[str, Any] = {}
  for key, value in sd.items():
    new = next((re.sub(pat, rep, key) for pat, rep in _RENAMES[family] if re.match(pat, key)),
               key)
    if new in out:
      raise ValueError(f"{key}: renames to {new!r}, which another key already gave")
    out[new] = value
  return out


def hf_to_mm(sd: Mapping[str, Any], rules: Sequence[Rule], prefix: Path = ()) -> Flat:
  """Applies `rules` to a (normalised) HF state dict; every non-ignored key must be used."""
  keys = {r.hf for r in rules}
  missing = sorted(keys - set(sd))
  extra = sorted(k for k in set(sd) - keys if not ignored(k))
  if missing or extra:
    raise ValueError(f"state dict does not match the config: missing {missing[:8]} "
                     f"({len(missing)}), unexpected {extra[:8]} ({len(extra)})")
  out: Flat = {}
  for r in rules:
    x = np.asarray(sd[r.hf])
    if x.shape != r.hf_shape:
      raise ValueError(f"{r.hf}: shape {x.shape}, expected {r.hf_shape} for "
                       f"{path_str(r.path)}")
    out[(*prefix, *r.path)] = r.to_mm(x)
  if len(out) != len(rules):
    raise ValueError("two rules write the same parameter path")
  return out


def mm_to_hf(flat: Mapping[Path, Any], rules: Sequence[Rule], prefix: Path = ()) -> dict:
  """Inverse of `hf_to_mm`: mm_jax arrays at `prefix + rule.path` -> 5.x-keyed HF arrays."""
  paths = {(*prefix, *r.path) for r in rules}
  if set(flat) != paths:
    raise ValueError(f"parameters do not match the config: missing "
                     f"{[path_str(p) for p in sorted(paths - set(flat), key=str)][:8]}, "
                     f"unexpected {[path_str(p) for p in sorted(set(flat) - paths, key=str)][:8]}")
  return {r.hf: r.to_hf(np.asarray(flat[(*prefix, *r.path)])) for r in rules}


def _untie(sd: dict[str, Any], embed_key: str, tied: bool) -> dict[str, Any]:
  """Drops `lm_head.weight` of tied embeddings (state_dict() lists it) if it is the table."""
  if tied and "lm_head.weight" in sd and embed_key in sd:
    if not np.array_equal(np.asarray(sd["lm_head.weight"]), np.asarray(sd[embed_key])):
      raise ValueError("lm_head.weight differs from the embedding but the config ties them")
    sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
  return sd


def vision_to_mm(sd: Mapping[str, Any], cfg: VisionConfig, prefix: Path = ()) -> Flat:
  """CLIPVisionModel / SiglipVisionModel state dict -> VisionTower params under `prefix`."""
  return hf_to_mm(normalize_keys(sd, "vision"), vision_rules(cfg), prefix)


def projector_to_mm(sd: Mapping[str, Any], cfg: ProjectorConfig, d_in: int, d_out: int,
                    prefix: Path = ()) -> Flat:
  """LlavaMultiModalProjector state dict (linear_1/linear_2) -> Projector params."""
  return hf_to_mm(sd, projector_rules(cfg, d_in, d_out), prefix)


def decoder_to_mm(sd: Mapping[str, Any], cfg: DecoderConfig, prefix: Path = ()) -> Flat:
  """LlamaForCausalLM / PhiForCausalLM (per cfg.family) state dict -> Decoder params."""
  sd = _untie(normalize_keys(sd, cfg.family), "model.embed_tokens.weight", cfg.tie_embeddings)
  return hf_to_mm(sd, decoder_rules(cfg), prefix)


def llava_to_mm(sd: Mapping[str, Any], cfg: ModelConfig) -> Flat:
  """LlavaForConditionalGeneration state dict (either layout) -> MultimodalModel params."""
  sd = normalize_keys(sd, "llava")
  sd = _untie(sd, "model.language_model.embed_tokens.weight", cfg.decoder.tie_embeddings)
  return hf_to_mm(sd, llava_rules(cfg))


def mm_to_vision(flat: Mapping[Path, Any], cfg: VisionConfig, prefix: Path = ()) -> dict:
  return mm_to_hf(flat, vision_rules(cfg), prefix)


def mm_to_decoder(flat: Mapping[Path, Any], cfg: DecoderConfig, prefix: Path = ()) -> dict:
  return mm_to_hf(flat, decoder_rules(cfg), prefix)


def mm_to_llava(flat: Mapping[Path, Any], cfg: ModelConfig) -> dict:
  """MultimodalModel params -> LlavaForConditionalGeneration state dict (5.x keys)."""
  return mm_to_hf(flat, llava_rules(cfg))


# ----------------------------------------------------------------------------- nnx models


def path_str(path: Path) -> str:
  return "/".join(map(str, path))


def flat_params(model: nnx.Module) -> Flat:
  """Every nnx.Param of `model` as numpy, keyed by its path."""
  return {p: np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _place(x: Any, like: Any) -> jax.Array:
  """x as a jax array with `like`'s dtype and sharding (if `like` has one)."""
  x = np.asarray(x, like.dtype)
  sharding = getattr(like, "sharding", None)
  return jax.device_put(x, sharding) if sharding is not None else jax.numpy.asarray(x)


def load_flat_into(model: nnx.Module, flat: Mapping[Path, Any]) -> None:
  """Sets every nnx.Param of `model` from `flat` (cast to the param's dtype, same sharding).

  `model` may be abstract (`nnx.eval_shape(lambda: Model(...))`): no random init is paid.
  Raises if a parameter is missing, a key names no parameter, or a shape differs.
  """
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  missing = sorted(map(path_str, set(params) - set(flat)))
  extra = sorted(map(path_str, set(flat) - set(params)))
  if missing or extra:
    raise ValueError(f"parameters not covered: {missing[:8]} ({len(missing)}); "
                     f"unknown paths: {extra[:8]} ({len(extra)})")
  for path, var in params.items():
    if tuple(np.shape(flat[path])) != tuple(var.shape):
      raise ValueError(f"{path_str(path)}: shape {np.shape(flat[path])}, model has {var.shape}")
  new = [(p, v.replace(_place(flat[p], v.get_value()))) for p, v in params.items()]
  nnx.update(model, nnx.from_flat_state(new))
