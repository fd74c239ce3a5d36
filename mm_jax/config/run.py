"""Config groups that describe a run around the model: data, optimizer, training loop,
checkpoints, mesh, initialisation, generation, eval and LoRA (config.data.* ... config.lora.*)."""

from __future__ import annotations

import dataclasses
import re

from mm_jax.config.checks import ConfigError, _check
from mm_jax.config.model import MODALITIES

EMBEDDED_SOURCES = ("synthetic", "synthetic_av")  # generated in the process: no files
SOURCES = (*EMBEDDED_SOURCES, "llava_json", "tfds", "coco_captions")


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
  # synthetic_av only: (question, answer) turns per train sample, all about its one scene
  # (synthetic_av.example); eval samples always ask one.
  turns: int = 1
  # synthetic_av only (other sources ignore both, as a preset's data may be swapped): the
  # first curriculum_samples train samples (curriculum_samples / batch_size steps) ask only
  # the questions labelled here ("video/direction", ...: entries of synthetic_av.LABELS);
  # the rest the whole mix. In order, unshuffled (pipeline.train_iterator).
  curriculum: tuple[str, ...] = ()
  curriculum_samples: int = 0  # see curriculum
  seq_len: int = 64  # tokens per packed row (T)
  images_per_sample: int = 1  # image slots per row (Mi); unused slots are invalid
  videos_per_sample: int = 1  # video slots per row (Mv), when the model reads video
  audios_per_sample: int = 1  # audio slots per row (Ma), when the model reads audio
  audio_seq_len: int = 3000  # log-mel frames per audio slot (L; 100 per second); longer
  # clips are cut to it
  pack: bool = True  # first-fit several samples into one row (segment ids keep them apart)
  num_train: int = 20000  # synthetic only
  num_eval: int = 512  # synthetic only
  seed: int = 0  # shuffling and synthetic-data seed
  worker_count: int = 0  # grain worker processes (0: decode in the main process)
  # grain read threads per process (0: read in the iterating thread; -1: 1 for the
  # synthetic sources, else grain's 16). Pillow and PyAV decode without the GIL and want
  # many; the synthetic sources are small numpy calls that hold it, and 16 threads fighting
  # over it on 2 cores made a mimo tiny batch 3.4x slower than one thread (0.21 s vs 0.06 s)
  # while taking the cores the step needs.
  read_threads: int = -1
  # llava_json: a LLaVA JSON / JSON Lines file, its image folder, a tokenizer
  # (SentencePiece .model, tokenizer.json, or a folder holding one), and a template.
  json: str = ""
  eval_json: str = ""  # held-out records for --mode=eval and the final eval
  image_dir: str = ""  # llava_json: folder the records' image paths are relative to
  tfds_dir: str = ""  # tfds: where the ArrayRecord conversion is written (once)
  tokenizer: str = ""  # llava_json: tokenizer file or folder (empty: the init folder's)
  template: str = "vicuna_v1"  # plain (stage 1) | vicuna_v1 (LLaVA-1.5) | llama3
  image_aspect_ratio: str = "pad"  # pad (LLaVA-1.5) | resize | crop
  strict: bool = False  # stop at the first bad record instead of skipping it
  # coco_captions only: text between the image's placeholders and its caption (not in the
  # loss; "" is LLaVA's plain layout), and one caption per image per epoch, picked by a
  # seeded RNG (data/coco.py), or all captions as samples.
  caption_separator: str = "\n"
  captions: str = "one"  # one | all
  max_skip_fraction: float = 0.01  # stop when more records than this are bad

  @property
  def embedded(self) -> bool:
    """Whether the source is generated in the process (no files, its own eval split)."""
    return self.source in EMBEDDED_SOURCES

  def validate(self, key: str) -> None:
    _check(self.source in SOURCES, f"{key}.source",
           f"unknown source {self.source!r} ({' | '.join(SOURCES)})")
    if not self.embedded:
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
    _check(self.read_threads >= -1, f"{key}.read_threads", "must be >= 0, or -1 (auto)")
    _check(self.turns >= 1, f"{key}.turns", f"must be >= 1, got {self.turns}")
    _check(self.curriculum_samples >= 0, f"{key}.curriculum_samples", "must be >= 0")
    _check(bool(self.curriculum) == bool(self.curriculum_samples), f"{key}.curriculum",
           "curriculum and curriculum_samples go together: both set or neither")
    if self.curriculum and self.source == "synthetic_av":
      from mm_jax.data.synthetic_av import LABELS  # numpy only: no cycle, no jax

      unknown = sorted(set(self.curriculum) - set(LABELS))
      _check(not unknown, f"{key}.curriculum", f"unknown labels {unknown}; known {LABELS}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 2e-5  # peak learning rate
  warmup_steps: int = 0  # linear warm-up steps, then cosine decay
  schedule: str = "cosine"  # cosine | constant (after warmup)
  min_lr_ratio: float = 0.0  # final learning rate as a fraction of lr
  weight_decay: float = 0.0  # AdamW decoupled weight decay
  b1: float = 0.9  # AdamW beta1
  b2: float = 0.999  # AdamW beta2
  eps: float = 1e-8  # AdamW epsilon
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
  steps: int = 1000  # optimizer steps in the run
  batch_size: int = 32  # global, per optimizer step
  seed: int = 0  # parameter init and dropout seed
  log_every: int = 10  # steps between progress lines and metrics.jsonl records
  eval_every: int = 0  # 0: only at the end
  eval_batches: int = 0  # 0: the whole held-out split
  # A step with a non-finite loss, gradient, update or new state applies no update; this
  # many in a row stop the run (exit 3, mm_jax/faults.py).
  max_nonfinite_steps: int = 10
  # Seconds without progress (a step, a save, an eval batch) before the run is stopped in one
  # line with exit 43, so that a stuck collective, writer or input pipeline cannot hold the
  # machines forever; it must exceed the first compile and the slowest save. 0: off.
  stall_timeout_s: float = 1800.0
  # Seconds from a stop signal (SIGTERM) to the scheduler's SIGKILL: the pod's
  # terminationGracePeriodSeconds, or 15 on GKE Spot whatever the pod asks. The stop saves
  # only while that leaves time, gives up a save that cannot commit by then, and exits 42
  # before the kill, so the scheduler reads a restart, not a crash. 0: no limit (wait).
  stop_grace_s: float = 0.0
  # Sequence positions per cross-entropy chunk (train/losses.py): the loss never holds
  # float32 [B, T, V] logits, only [B, loss_chunk, V]; 0: the whole sequence at once.
  loss_chunk: int = 0

  def validate(self, key: str) -> None:
    _check(self.steps > 0, f"{key}.steps", "must be positive")
    _check(self.loss_chunk >= 0, f"{key}.loss_chunk", "must be >= 0 (0: no chunking)")
    _check(self.max_nonfinite_steps > 0, f"{key}.max_nonfinite_steps", "must be positive")
    _check(self.stall_timeout_s >= 0, f"{key}.stall_timeout_s", "must be >= 0 (0: off)")
    _check(self.stop_grace_s >= 0, f"{key}.stop_grace_s", "must be >= 0 (0: no limit)")
    _check(self.batch_size > 0, f"{key}.batch_size", "must be positive")
    _check(self.log_every > 0, f"{key}.log_every", "must be positive")
    _check(self.eval_every >= 0, f"{key}.eval_every", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 500  # steps between checkpoints
  keep: int = 3  # newest checkpoints kept (older ones rotate out only after a newer one commits)
  async_save: bool = True  # write checkpoints in the background while training goes on
  # Resume from a checkpoint without its integrity record (digests), unverified: only for
  # checkpoints written before digests existed. Off: such a checkpoint is refused by name.
  allow_unverified: bool = False

  def validate(self, key: str) -> None:
    _check(self.every > 0, f"{key}.every", "must be positive")
    _check(self.keep > 0, f"{key}.keep", "must be positive")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh ("data", "fsdp", "tensor"); one size may be -1 (the remaining devices)."""

  data: int = -1  # data-parallel axis size (-1: the devices left over)
  fsdp: int = 1  # fully sharded data-parallel axis size (parameters and optimizer state sharded)
  tensor: int = 1  # tensor-parallel axis size

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
  decoder_from_hf: LlamaForCausalLM / MistralForCausalLM / PhiForCausalLM; llava_from_hf:
  LlavaForConditionalGeneration or LlavaNextVideoForConditionalGeneration (all of the model
  but audio, so it excludes the first two); audio_from_hf: the encoder of a WhisperModel /
  WhisperForConditionalGeneration (or a bare WhisperEncoder) for towers/audio, needs
  "audio" in config.model.modalities. The model's shape fields are taken from the folders
  (mm_jax/interop/hf_adopt.py).
  """

  vision_from_hf: str = ""  # HF CLIP/SigLIP folder for the vision tower
  decoder_from_hf: str = ""  # HF LLaMA/Mistral/Phi folder for the decoder
  llava_from_hf: str = ""  # HF LLaVA or LLaVA-NeXT-Video folder for the whole model
  audio_from_hf: str = ""  # HF Whisper folder for the audio tower

  def validate(self, key: str) -> None:
    _check(not (self.llava_from_hf and (self.vision_from_hf or self.decoder_from_hf)),
           f"{key}.llava_from_hf", "covers the whole model: leave vision_from_hf and "
           "decoder_from_hf empty")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Decoding for --mode=generate and generation-based eval (mm_jax.infer)."""

  max_new_tokens: int = 32  # tokens generated per answer at most
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: no cut
  top_p: float = 1.0  # 1: no cut
  seed: int = 0  # sampling seed
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
