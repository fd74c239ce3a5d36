"""Typed, frozen run configuration: the ONE place an ml_collections ConfigDict becomes types.

`from_config_dict(cd)` walks the dataclasses below, rejects unknown keys, checks types and
values, and names the offending key (`config.optim.lr`) in every error. Modules receive
only the dataclass they need (e.g. `VisionConfig`), never the root config.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "auto")
MERGE_IMPLS = ("xla", "pallas", "auto")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")  # mm_jax/models/remat.py
STAGES = ("full", "pretrain", "finetune", "finetune_lora", "finetune_qlora")


class ConfigError(ValueError):
  """A bad configuration value; the message starts with the full key."""


def _check(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{key}: {msg}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A CLIP or SigLIP vision tower (ViT)."""

  kind: str = "clip"  # clip (class token, pre-LN, quick_gelu) | siglip (no class token, gelu-tanh)
  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  heads: int = 16
  mlp_dim: int = 4096
  layer_norm_eps: float = 1e-5
  # hidden_states index as in transformers: 0 = embeddings, i = after layer i, -1 = last layer.
  feature_layer: int = -2
  feature_select: str = "patch"  # patch | cls_patch (CLIP only)
  # Per-channel normalisation the data pipeline applies (CLIP's defaults).
  mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
  std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def tokens_per_image(self) -> int:
    """Rows the tower hands to the projector for one image."""
    return self.num_patches + (1 if self.feature_select == "cls_patch" else 0)

  def validate(self, key: str) -> None:
    _check(self.kind in ("clip", "siglip"), f"{key}.kind",
           f"must be clip|siglip, got {self.kind!r}")
    _check(self.image_size % self.patch_size == 0, f"{key}.image_size",
           f"{self.image_size} is not a multiple of patch_size {self.patch_size}")
    _check(self.width % self.heads == 0, f"{key}.width", f"{self.width} not divisible by heads")
    _check(-self.depth - 1 <= self.feature_layer <= self.depth, f"{key}.feature_layer",
           f"{self.feature_layer} outside [-{self.depth + 1}, {self.depth}]")
    _check(self.feature_select in ("patch", "cls_patch"), f"{key}.feature_select",
           f"must be patch|cls_patch, got {self.feature_select!r}")
    _check(self.kind == "clip" or self.feature_select == "patch", f"{key}.feature_select",
           "cls_patch needs a class token (kind=clip)")
    _check(len(self.mean) == 3 and len(self.std) == 3, f"{key}.mean", "mean/std need 3 values")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  kind: str = "mlp2x_gelu"  # linear | mlp2x_gelu | residual_mlp
  depth: int = 2  # residual blocks for residual_mlp

  def validate(self, key: str) -> None:
    _check(self.kind in ("linear", "mlp2x_gelu", "residual_mlp"), f"{key}.kind",
           f"must be linear|mlp2x_gelu|residual_mlp, got {self.kind!r}")
    _check(self.depth >= 1, f"{key}.depth", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class AudioConfig:
  """A Whisper-style audio tower (log-mel conv stem + pre-LN transformer) and its projector.

  Defaults: whisper-small's encoder. Input: log-mel frames at 100 Hz (hop 160 at 16 kHz);
  the conv stem halves the frame rate, `pool` then averages `pool` frames (Qwen2-Audio: 2,
  i.e. 25 tokens per second; 1 = plain Whisper).
  """

  kind: str = "whisper"
  n_mels: int = 80  # 80 (whisper up to large-v2) | 128 (large-v3, Qwen2-Audio)
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  max_source_positions: int = 1500  # frames after the stem: 30 s; input <= 2x this
  layer_norm_eps: float = 1e-5
  pool: int = 2  # average pooling stride over time before the final LayerNorm; 1 = none
  projector: str = "mlp"  # linear | mlp (Linear-GELU-Linear) to the decoder width

  def validate(self, key: str) -> None:
    _check(self.kind == "whisper", f"{key}.kind", f"must be whisper, got {self.kind!r}")
    for name in ("n_mels", "width", "depth", "heads", "mlp_dim", "max_source_positions",
                 "pool"):
      _check(getattr(self, name) > 0, f"{key}.{name}", "must be positive")
    _check(self.width % self.heads == 0, f"{key}.width", f"{self.width} not divisible by heads")
    # The sinusoidal table splits the width into sin and cos halves of >= 2 channels each.
    _check(self.width % 2 == 0 and self.width >= 4, f"{key}.width", "must be even and >= 4")
    _check(self.layer_norm_eps > 0, f"{key}.layer_norm_eps", "must be positive")
    _check(self.projector in ("linear", "mlp"), f"{key}.projector",
           f"must be linear|mlp, got {self.projector!r}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A causal decoder: LLaMA family (LLaMA/Vicuna/Mistral: RMSNorm, SwiGLU, grouped-query
  attention, full RoPE) or Phi family (Phi-1/1.5/2: LayerNorm, GELU MLP, parallel block,
  partial RoPE, biases). Defaults are LLaMA.

  `family` names the Hugging Face layout (LlamaForCausalLM | PhiForCausalLM) and fixes what
  that class computes; the fields below it must agree, so a config reads the same in both
  directions. LLaMA may add q/k/v/o and MLP biases (LlamaConfig's attention_bias/mlp_bias);
  PhiModel hard-codes all of its biases. lm_head_bias is free for Phi: PhiForCausalLM's
  lm_head has one, LlavaForConditionalGeneration's (transformers 5.x) does not.
  """

  vocab_size: int = 32000
  width: int = 4096
  depth: int = 32
  heads: int = 32
  kv_heads: int = 32
  head_dim: int = 0  # 0: width // heads
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  family: str = "llama"  # llama | phi
  norm: str = "rms"  # rms | layer (LayerNorm with bias); the final norm too
  mlp: str = "swiglu"  # swiglu: down(silu(gate) * up) | gelu: fc2(gelu_tanh(fc1)) (gelu_new)
  # Phi: x + attn(ln(x)) + mlp(ln(x)), one shared input norm (no mlp_norm).
  parallel_block: bool = False
  # Leading share of each head's dims that RoPE rotates (Phi-2: 0.4, 32 of 80); the rest
  # pass through. Rotated dims = int(head_size * rotary_fraction), as transformers rounds.
  rotary_fraction: float = 1.0
  attention_bias: bool = False  # q, k, v and output projections
  mlp_bias: bool = False
  lm_head_bias: bool = False

  @property
  def head_size(self) -> int:
    return self.head_dim or self.width // self.heads

  @property
  def rotary_dims(self) -> int:
    return int(self.head_size * self.rotary_fraction)

  def validate(self, key: str) -> None:
    for name in ("vocab_size", "width", "depth", "heads", "kv_heads", "mlp_dim"):
      _check(getattr(self, name) > 0, f"{key}.{name}", "must be positive")
    _check(self.heads % self.kv_heads == 0, f"{key}.heads",
           f"{self.heads} heads not a multiple of kv_heads {self.kv_heads}")
    _check(self.head_dim > 0 or self.width % self.heads == 0, f"{key}.width",
           "not divisible by heads; set head_dim")
    _check(self.rope_theta > 0, f"{key}.rope_theta", "must be positive")
    _check(self.norm_eps > 0, f"{key}.norm_eps", "must be positive")
    _check(self.norm in ("rms", "layer"), f"{key}.norm", f"must be rms|layer, got {self.norm!r}")
    _check(self.mlp in ("swiglu", "gelu"), f"{key}.mlp",
           f"must be swiglu|gelu, got {self.mlp!r}")
    _check(0 < self.rotary_fraction <= 1, f"{key}.rotary_fraction", "must be in (0, 1]")
    # Rotate-half pairs dim i with i + r/2, so the rotated block needs an even size.
    _check(self.rotary_dims >= 2 and self.rotary_dims % 2 == 0, f"{key}.rotary_fraction",
           f"{self.rotary_fraction} x head size {self.head_size} gives {self.rotary_dims} "
           "rotated dims; need an even number >= 2")
    _check(self.family in FAMILIES, f"{key}.family",
           f"must be one of {tuple(FAMILIES)}, got {self.family!r}")
    for name, want in FAMILIES[self.family].items():
      _check(getattr(self, name) == want, f"{key}.{name}",
             f"family={self.family} needs {name}={want!r}, got {getattr(self, name)!r}")


# What each decoder family's Hugging Face class computes, field by field; fields not named
# (e.g. LLaMA's attention_bias / mlp_bias, tie_embeddings) are free within the family.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(norm="rms", mlp="swiglu", parallel_block=False, rotary_fraction=1.0,
                  lm_head_bias=False),
    "phi": dict(norm="layer", mlp="gelu", parallel_block=True, attention_bias=True,
                mlp_bias=True),
}


@dataclasses.dataclass(frozen=True)
class VideoConfig:
  """Video as frames through a ViT (LLaVA-NeXT-Video style).

  Each frame gives the vision tower's patch features (`vision.feature_layer`, class token
  dropped), average-pooled over the patch grid with stride `pool`, then projected; one
  `<video>` tag expands to num_frames x (grid / pool)^2 placeholders.
  """

  num_frames: int = 8
  pool: int = 2  # spatial average pooling stride on each frame's patch grid; 1 = none
  tower: str = "shared"  # shared: the image tower (towers/image) | separate: towers/video
  projector: str = "separate"  # shared: the image projector | separate: projectors/video

  def validate(self, key: str, vision: VisionConfig) -> None:
    _check(self.num_frames >= 1, f"{key}.num_frames", "must be >= 1")
    grid = vision.image_size // vision.patch_size
    _check(self.pool >= 1 and grid % self.pool == 0, f"{key}.pool",
           f"{self.pool} must divide the {grid}x{grid} patch grid")
    _check(self.tower in ("shared", "separate"), f"{key}.tower", "must be shared|separate")
    _check(self.projector in ("shared", "separate"), f"{key}.projector",
           "must be shared|separate")
    _check(vision.feature_select == "patch", f"{key}.tower",
           "video pooling needs patch features (vision.feature_select=patch)")

  def tokens_per_video(self, vision: VisionConfig) -> int:
    grid = vision.image_size // vision.patch_size // self.pool
    return self.num_frames * grid * grid


MODALITIES = ("image", "video", "audio")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vision: VisionConfig = VisionConfig()
  projector: ProjectorConfig = ProjectorConfig()
  decoder: DecoderConfig = DecoderConfig()
  video: VideoConfig = VideoConfig()
  audio: AudioConfig = AudioConfig()
  # Which inputs the model reads besides text (towers and projectors are built for these).
  modalities: tuple[str, ...] = ("image",)
  # Placeholder id of `<image>`; may lie outside the vocabulary (LLaVA's sentinel style):
  # placeholder positions are never looked up in the embedding table.
  image_token_id: int = 32000
  video_token_id: int = 32001
  audio_token_id: int = 32002
  attention: str = "auto"
  merge: str = "auto"
  dtype: str = "bfloat16"  # compute dtype; parameters stay in param_dtype
  param_dtype: str = "float32"
  # Rematerialise each transformer block in the backward pass: none | full (keep only the
  # block input) | dots (also keep the weight matmuls' outputs); see models/remat.py.
  remat: str = "none"
  # Time codes (models/timecode.py): none | learned, one vector per time slot (a video
  # frame's span of the clip) added to the video and audio rows of that slot.
  time_code: str = "none"

  def validate(self, key: str) -> None:
    self.vision.validate(f"{key}.vision")
    self.projector.validate(f"{key}.projector")
    self.decoder.validate(f"{key}.decoder")
    _check(self.attention in ATTENTION_IMPLS, f"{key}.attention",
           f"must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
    _check(self.merge in MERGE_IMPLS, f"{key}.merge",
           f"must be one of {MERGE_IMPLS}, got {self.merge!r}")
    _check(self.dtype in DTYPES, f"{key}.dtype", f"must be one of {DTYPES}")
    _check(self.param_dtype in DTYPES, f"{key}.param_dtype", f"must be one of {DTYPES}")
    _check(self.remat in REMAT, f"{key}.remat", f"must be one of {REMAT}, got {self.remat!r}")
    _check(self.time_code in ("none", "learned"), f"{key}.time_code",
           f"must be none|learned, got {self.time_code!r}")
    _check(len(self.modalities) == len(set(self.modalities))
           and set(self.modalities) <= set(MODALITIES), f"{key}.modalities",
           f"{self.modalities}: each of {MODALITIES} at most once")
    ids = {m: getattr(self, f"{m}_token_id") for m in self.modalities}
    for m, i in ids.items():
      _check(i >= 0, f"{key}.{m}_token_id", "must be >= 0")
    _check(len(set(ids.values())) == len(ids), f"{key}.modalities",
           f"placeholder ids must differ: {ids}")
    if "video" in self.modalities:
      self.video.validate(f"{key}.video", self.vision)
    if "audio" in self.modalities:
      self.audio.validate(f"{key}.audio")

  def token_id(self, modality: str) -> int:
    return getattr(self, f"{modality}_token_id")


SOURCES = ("synthetic", "synthetic_av", "llava_json", "tfds", "coco_captions")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # synthetic (shapes, images) | synthetic_av (audio-video task) | llava_json | tfds
  # (llava_json via ArrayRecord) | coco_captions (COCO captions_*.json; data/coco.py)
  source: str = "synthetic"
  task: str = "qa"  # synthetic only: qa (stage 2 style) | caption (stage 1 style)
  clip_seconds: float = 1.0  # synthetic_av only: length of each generated clip
  # synthetic_av only: interleave each video frame's placeholders with the audio tokens of
  # the same time slot (pipeline.av_tags) instead of all video, then all audio.
  interleave_av: bool = False
  seq_len: int = 64
  images_per_sample: int = 1  # image slots per row (Mi); unused slots are invalid
  videos_per_sample: int = 1  # video slots per row (Mv), when the model reads video
  audios_per_sample: int = 1  # audio slots per row (Ma), when the model reads audio
  audio_seq_len: int = 3000  # log-mel frames per audio slot (L; 100 per second); longer
  # clips are cut to it
  pack: bool = True  # first-fit several samples into one row (segment ids keep them apart)
  num_train: int = 20000  # synthetic only
  num_eval: int = 512  # synthetic only
  seed: int = 0
  worker_count: int = 0  # grain worker processes (0: decode in the main process)
  # llava_json: a LLaVA JSON / JSON Lines file, its image folder, a tokenizer
  # (SentencePiece .model, tokenizer.json, or a folder holding one), and a template.
  json: str = ""
  eval_json: str = ""  # held-out records for --mode=eval and the final eval
  image_dir: str = ""
  tfds_dir: str = ""  # tfds: where the ArrayRecord conversion is written (once)
  tokenizer: str = ""
  template: str = "vicuna_v1"  # plain (stage 1) | vicuna_v1 (LLaVA-1.5) | llama3
  image_aspect_ratio: str = "pad"  # pad (LLaVA-1.5) | resize | crop
  strict: bool = False  # stop at the first bad record instead of skipping it
  # coco_captions only: text between the image's placeholders and its caption (not in the
  # loss; "" is LLaVA's plain layout), and one caption per image per epoch, picked by a
  # seeded RNG (data/coco.py), or all captions as samples.
  caption_separator: str = "\n"
  captions: str = "one"  # one | all
  max_skip_fraction: float = 0.01  # stop when more records than this are bad

  def validate(self, key: str) -> None:
    _check(self.source in SOURCES, f"{key}.source",
           f"unknown source {self.source!r} ({' | '.join(SOURCES)})")
    if self.source not in ("synthetic", "synthetic_av"):
      names = ("json", "image_dir", "tokenizer") + (("tfds_dir",) if self.source == "tfds"
                                                   else ())
      for name in names:
        _check(bool(getattr(self, name)), f"{key}.{name}", f"required by source={self.source}")
    _check(self.template in ("plain", "vicuna_v1", "llama3"), f"{key}.template",
           f"must be plain|vicuna_v1|llama3, got {self.template!r}")
    _check(self.captions in ("one", "all"), f"{key}.captions",
           f"must be one|all, got {self.captions!r}")
    # Captions are stage-1 samples; say so rather than silently ignore another template.
    _check(self.source != "coco_captions" or self.template == "plain", f"{key}.template",
           f"source=coco_captions renders captions with the plain template; got "
           f"{self.template!r}")
    _check(self.image_aspect_ratio in ("pad", "resize", "crop"), f"{key}.image_aspect_ratio",
           f"must be pad|resize|crop, got {self.image_aspect_ratio!r}")
    _check(0 <= self.max_skip_fraction <= 1, f"{key}.max_skip_fraction", "must be in [0, 1]")
    _check(self.task in ("qa", "caption"), f"{key}.task", f"must be qa|caption, got {self.task!r}")
    _check(self.seq_len > 0, f"{key}.seq_len", "must be positive")
    for name in ("images_per_sample", "videos_per_sample", "audios_per_sample",
                 "audio_seq_len"):
      _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
    _check(self.num_train > 0 and self.num_eval > 0, f"{key}.num_train", "splits must be non-empty")
    _check(self.worker_count >= 0, f"{key}.worker_count", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 2e-5
  warmup_steps: int = 0
  schedule: str = "cosine"  # cosine | constant (after warmup)
  min_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0  # 0 disables global-norm clipping
  grad_accum: int = 1  # micro-batches per optimizer step
  # Regexes over parameter paths ("decoder/layers/3/mlp/up/kernel"); a match is frozen:
  # no gradient and no optimizer state.
  freeze: tuple[str, ...] = ()

  def validate(self, key: str) -> None:
    _check(self.lr > 0, f"{key}.lr", f"must be positive, got {self.lr}")
    _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
    _check(self.schedule in ("cosine", "constant"), f"{key}.schedule", "must be cosine|constant")
    _check(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "must be in [0, 1]")
    _check(self.grad_accum >= 1, f"{key}.grad_accum", "must be >= 1")
    _check(self.clip_norm >= 0, f"{key}.clip_norm", "must be >= 0")
    for i, pattern in enumerate(self.freeze):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f"{key}.freeze[{i}]: bad regex {pattern!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 32  # global, per optimizer step
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0: only at the end
  eval_batches: int = 0  # 0: the whole held-out split

  def validate(self, key: str) -> None:
    _check(self.steps > 0, f"{key}.steps", "must be positive")
    _check(self.batch_size > 0, f"{key}.batch_size", "must be positive")
    _check(self.log_every > 0, f"{key}.log_every", "must be positive")
    _check(self.eval_every >= 0, f"{key}.eval_every", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 500
  keep: int = 3
  async_save: bool = True

  def validate(self, key: str) -> None:
    _check(self.every > 0, f"{key}.every", "must be positive")
    _check(self.keep > 0, f"{key}.keep", "must be positive")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh ("data", "fsdp", "tensor"); one size may be -1 (the remaining devices)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)

  def validate(self, key: str) -> None:
    _check(sum(s == -1 for s in self.shape) <= 1, key, "at most one axis may be -1")
    _check(all(s == -1 or s >= 1 for s in self.shape), key, "sizes must be >= 1 or -1")


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Local Hugging Face folders (safetensors) to start a fresh run from; "" = random init.

  vision_from_hf: CLIPVisionModel / SiglipVisionModel (or a full CLIPModel / SiglipModel);
  decoder_from_hf: LlamaForCausalLM or PhiForCausalLM; llava_from_hf:
  LlavaForConditionalGeneration (all of the model but audio, so it excludes the first two);
  audio_from_hf: the encoder of a WhisperModel / WhisperForConditionalGeneration (or a bare
  WhisperEncoder) for towers/audio, needs "audio" in config.model.modalities. Shapes must
  match config.model.
  """

  vision_from_hf: str = ""
  decoder_from_hf: str = ""
  llava_from_hf: str = ""
  audio_from_hf: str = ""

  def validate(self, key: str) -> None:
    _check(not (self.llava_from_hf and (self.vision_from_hf or self.decoder_from_hf)),
           f"{key}.llava_from_hf", "covers the whole model: leave vision_from_hf and "
           "decoder_from_hf empty")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Decoding for --mode=generate and generation-based eval (mm_jax.infer)."""

  max_new_tokens: int = 32
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: no cut
  top_p: float = 1.0  # 1: no cut
  seed: int = 0
  stop: tuple[int, ...] = ()  # extra stop ids; the template's end token always stops

  def validate(self, key: str) -> None:
    _check(self.max_new_tokens > 0, f"{key}.max_new_tokens", "must be positive")
    _check(self.temperature >= 0, f"{key}.temperature", "must be >= 0 (0: greedy)")
    _check(self.top_k >= 0, f"{key}.top_k", "must be >= 0 (0: no cut)")
    _check(0 < self.top_p <= 1, f"{key}.top_p", "must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What --mode=eval and the in-training evals report besides loss and perplexity."""

  # Greedy-generate each held-out answer and score it VQA-style (normalised exact match),
  # besides the teacher-forced exact match.
  generate: bool = True
  # Ablation: zero this modality's input (image | video | audio) in every eval batch.
  drop_modality: str = ""

  def validate(self, key: str) -> None:
    _check(self.drop_modality in ("", *MODALITIES), f"{key}.drop_modality",
           f"must be empty or one of {MODALITIES}, got {self.drop_modality!r}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on frozen Dense kernels (`mm_jax.models.lora`). Adapters always
  train; `optim.freeze` applies to the base parameters only."""

  rank: int = 0  # 0: off
  alpha: float = 16.0  # delta scaled by alpha / rank
  dropout: float = 0.0  # inverted dropout on the adapter input, training only
  # Regexes over module paths ("decoder/layers/3/q"); every matching Dense gets an adapter.
  targets: tuple[str, ...] = (r"^decoder/layers/\d+/(q|k|v|o|gate|up|down|fc1|fc2)$",)
  # none | int8 | nf4: the targeted (frozen) base kernels stored block-quantised
  # (mm_jax.models.quant); embeddings, norms and biases stay in param_dtype.
  base_qtype: str = "none"
  block_size: int = 64  # quantisation block along the kernel's (flattened) input dims

  def validate(self, key: str) -> None:
    _check(self.rank >= 0, f"{key}.rank", f"must be >= 0, got {self.rank}")
    _check(self.alpha > 0, f"{key}.alpha", f"must be positive, got {self.alpha}")
    _check(0.0 <= self.dropout < 1.0, f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")
    _check(self.rank == 0 or self.targets, f"{key}.targets", "empty, but rank > 0")
    for i, pattern in enumerate(self.targets):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f"{key}.targets[{i}]: bad regex {pattern!r}: {e}") from e
    _check(self.base_qtype in ("none", "int8", "nf4"), f"{key}.base_qtype",
           f"must be none|int8|nf4, got {self.base_qtype!r}")
    _check(self.block_size > 0 and self.block_size % 2 == 0, f"{key}.block_size",
           f"must be positive and even, got {self.block_size}")
    _check(self.base_qtype == "none" or self.rank > 0, f"{key}.base_qtype",
           f"{self.base_qtype} quantises the kernels that carry adapters: needs rank > 0")


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "tiny"
  stage: str = "full"  # full | pretrain | finetune | finetune_lora | finetune_qlora
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()
  init: InitConfig = InitConfig()
  generate: GenerateConfig = GenerateConfig()
  eval: EvalConfig = EvalConfig()
  lora: LoraConfig = LoraConfig()

  def validate(self, key: str = "config") -> None:
    _check(self.stage in STAGES, f"{key}.stage",
           f"must be {'|'.join(STAGES)}, got {self.stage!r}")
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if dataclasses.is_dataclass(value):
        value.validate(f"{key}.{f.name}")
    _check(self.stage == "full" or self.optim.freeze, f"{key}.stage",
           f"{self.stage} freezes modules but config.optim.freeze is empty; pick the stage in "
           "the config argument (configs/llava.py:7b,stage=pretrain), not by override")
    _check(not self.stage.endswith("lora") or self.lora.rank > 0, f"{key}.lora.rank",
           f"stage {self.stage} trains adapters: rank must be > 0")
    _check(self.stage != "finetune_qlora" or self.lora.base_qtype != "none",
           f"{key}.lora.base_qtype", "stage finetune_qlora needs a quantised base (int8|nf4)")
    _check(self.train.batch_size % self.optim.grad_accum == 0, f"{key}.optim.grad_accum",
           f"{self.optim.grad_accum} does not divide train.batch_size {self.train.batch_size}")
    _check(not self.init.audio_from_hf or "audio" in self.model.modalities,
           f"{key}.init.audio_from_hf", f"needs 'audio' in {key}.model.modalities "
           f"(got {self.model.modalities})")


def _coerce(value: Any, hint: Any, key: str) -> Any:
  """Returns `value` as type `hint`, or raises ConfigError naming `key`."""
  origin = typing.get_origin(hint)
  if dataclasses.is_dataclass(hint):
    _check(isinstance(value, Mapping), key, f"expected a group of fields, got {value!r}")
    return _build(hint, value, key)
  if origin is tuple:
    _check(isinstance(value, (tuple, list)), key, f"expected a tuple, got {value!r}")
    (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
    return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
  if origin in (typing.Union, types.UnionType):
    for arg in typing.get_args(hint):
      if arg is type(None) and value is None:
        return None
    hint = next(a for a in typing.get_args(hint) if a is not type(None))
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint is bool:
    _check(isinstance(value, bool), key, f"expected a bool, got {value!r}")
  elif hint is int:
    _check(isinstance(value, int) and not isinstance(value, bool), key,
           f"expected an int, got {value!r}")
  else:
    _check(isinstance(value, hint), key, f"expected {hint.__name__}, got {value!r}")
  return value


def _build(cls: type, values: Mapping[str, Any], key: str) -> Any:
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  _check(not unknown, f"{key}.{unknown[0]}" if unknown else key,
         f"unknown key (known: {', '.join(sorted(names))})")
  kwargs = {k: _coerce(v, hints[k], f"{key}.{k}") for k, v in values.items()}
  return cls(**kwargs)


def from_config_dict(cd: Any) -> Config:
  """ConfigDict (or plain nested dict) -> validated, frozen `Config`."""
  values = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
  config = _tokenizer_from_init(_build(Config, values, "config"))
  config.validate()
  return config


def _tokenizer_from_init(config: Config) -> Config:
  """An empty data.tokenizer defaults to the tokenizer shipped in the Hugging Face folder
  the language model comes from (init.llava_from_hf, else init.decoder_from_hf)."""
  folder = config.init.llava_from_hf or config.init.decoder_from_hf
  names = ("tokenizer.json", "tokenizer.model")
  if (config.data.tokenizer or not folder
      or not any(os.path.isfile(os.path.join(folder, n)) for n in names)):
    return config
  return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=folder))


def to_dict(config: Config) -> dict[str, Any]:
  """JSON-ready dict (written to workdir/config.json)."""
  return dataclasses.asdict(config)
