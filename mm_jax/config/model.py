"""Config groups that describe the model: towers, projectors, decoder, video, and the
model that holds them (config.model.*)."""

from __future__ import annotations

import dataclasses
from typing import Any

from mm_jax.config.checks import _check

ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "auto")
MERGE_IMPLS = ("xla", "pallas", "auto")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")  # mm_jax/models/remat.py


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A CLIP or SigLIP vision tower (ViT)."""

  kind: str = "clip"  # clip (class token, pre-LN, quick_gelu) | siglip (no class token, gelu-tanh)
  image_size: int = 224  # input side S in pixels (images are fitted to S x S)
  patch_size: int = 14  # ViT patch side in pixels
  width: int = 1024  # ViT hidden size
  depth: int = 24  # ViT blocks
  heads: int = 16  # ViT attention heads
  mlp_dim: int = 4096  # ViT MLP hidden size
  layer_norm_eps: float = 1e-5  # LayerNorm epsilon
  # hidden_states index as in transformers: 0 = embeddings, i = after layer i, -1 = last layer.
  feature_layer: int = -2
  feature_select: str = "patch"  # patch | cls_patch (CLIP only)
  # Per-channel normalisation the data pipeline applies (CLIP's defaults).
  mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
  # per-channel pixel std (CLIP's by default; SigLIP: 0.5)
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

  kind: str = "whisper"  # audio tower architecture (whisper)
  n_mels: int = 80  # 80 (whisper up to large-v2) | 128 (large-v3, Qwen2-Audio)
  width: int = 768  # audio tower hidden size
  depth: int = 12  # audio tower blocks
  heads: int = 12  # audio tower attention heads
  mlp_dim: int = 3072  # audio tower MLP hidden size
  max_source_positions: int = 1500  # frames after the stem: 30 s; input <= 2x this
  layer_norm_eps: float = 1e-5  # LayerNorm epsilon
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

  vocab_size: int = 32000  # vocabulary size V (embedding rows, logits)
  width: int = 4096  # hidden size D
  depth: int = 32  # decoder blocks
  heads: int = 32  # query heads
  kv_heads: int = 32  # key/value heads (fewer than heads: grouped-query attention)
  head_dim: int = 0  # 0: width // heads
  mlp_dim: int = 11008  # MLP hidden size
  rope_theta: float = 10000.0  # RoPE base
  norm_eps: float = 1e-5  # RMSNorm / LayerNorm epsilon
  tie_embeddings: bool = False  # lm_head shares the embedding table
  family: str = "llama"  # llama | phi
  norm: str = "rms"  # rms | layer (LayerNorm with bias); the final norm too
  mlp: str = "swiglu"  # swiglu: down(silu(gate) * up) | gelu: fc2(gelu_tanh(fc1)) (gelu_new)
  # Phi: x + attn(ln(x)) + mlp(ln(x)), one shared input norm (no mlp_norm).
  parallel_block: bool = False
  # Leading share of each head's dims that RoPE rotates (Phi-2: 0.4, 32 of 80); the rest
  # pass through. Rotated dims = int(head_size * rotary_fraction), as transformers rounds.
  rotary_fraction: float = 1.0
  attention_bias: bool = False  # q, k, v and output projections
  mlp_bias: bool = False  # biases in the MLP projections
  lm_head_bias: bool = False  # a bias on the vocabulary projection (Phi)

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

  num_frames: int = 8  # frames sampled per video (F)
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
  video_token_id: int = 32001  # placeholder id of `<video>`
  audio_token_id: int = 32002  # placeholder id of `<audio>`
  attention: str = "auto"  # auto | xla | pallas (auto: pallas on GPU/TPU, xla on CPU)
  merge: str = "auto"  # multimodal token merge: auto | xla | pallas
  dtype: str = "bfloat16"  # compute dtype; parameters stay in param_dtype
  param_dtype: str = "float32"  # parameter storage dtype (float32 keeps the master weights)
  # Rematerialise each transformer block in the backward pass: none | full (keep only the
  # block input) | dots (also keep the weight matmuls' outputs); see models/remat.py.
  remat: str = "none"
  # Keep each tower's and the decoder's layers as one stacked block run by a scan
  # (models/stack.py): compile time flat in depth, memory fixed by the scan's carries.
  # Parameters are stored [L, ...] (checkpoints of the two layouts differ); HF import and
  # export, LoRA targets and freeze patterns still name layers as ".../layers/3/...".
  scan_layers: bool = False
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
