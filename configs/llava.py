r"""LLaVA-style vision-language presets.

  python main.py --config=configs/llava.py:tiny --workdir=/tmp/tiny
  python main.py --config=configs/llava.py:7b,stage=pretrain --dry_run
  python main.py --config=configs/llava.py:7b,stage=finetune --config.optim.lr=1e-5 ...

The arg is `<preset>[,stage=<full|pretrain|finetune|finetune_lora|finetune_qlora>]`.
Presets: tiny (CPU, minutes), 1b (CLIP ViT-L/14-336 + a 1.1B LLaMA: the benchmark shape),
7b (LLaVA-1.5-7B), 13b (LLaVA-1.5-13B), phi2 (CLIP ViT-B/16 + Phi-2 2.7B: a small-GPU
LLaVA; issue 8). Stages follow LLaVA-1.5 (Liu et al. 2023, Table 9): pretrain trains the
projector only at lr 1e-3; finetune also trains the decoder at lr 2e-5; full trains all.
finetune_lora trains the projector and rank-8 LoRA adapters on the decoder's projections
at lr 2e-4 (LLaVA-1.5's LoRA recipe uses rank 128 and lr 2e-4; override config.lora.rank),
adapter dropout 0.05, the base frozen; finetune_qlora also stores the frozen base
kernels in NF4 (blocks of 64, float32 scales; QLoRA, Dettmers et al. 2023).
"""

import ml_collections

from mm_jax import config as config_lib

# CLIP ViT-L/14 at 336 px, features from the second-to-last layer, patch tokens only.
_CLIP_L_336 = dict(kind="clip", image_size=336, patch_size=14, width=1024, depth=24, heads=16,
                   mlp_dim=4096, feature_layer=-2, feature_select="patch")

# CLIP ViT-B/16 at 224 px (openai/clip-vit-base-patch16): 196 patches per image.
_CLIP_B_224 = dict(kind="clip", image_size=224, patch_size=16, width=768, depth=12, heads=12,
                   mlp_dim=3072, feature_layer=-2, feature_select="patch")

# microsoft/phi-2 (PhiForCausalLM): parallel attention + GELU MLP off one LayerNorm, RoPE on
# 32 of 80 head dims, biases everywhere incl. lm_head (decoder_from_hf loads it as is).
_PHI2 = dict(vocab_size=51200, width=2560, depth=32, heads=32, kv_heads=32, mlp_dim=10240,
             rope_theta=10000.0, norm_eps=1e-5, family="phi", norm="layer", mlp="gelu",
             parallel_block=True, rotary_fraction=0.4, attention_bias=True, mlp_bias=True,
             lm_head_bias=True)

# LLaMA defaults of the decoder fields every preset may override (config.model.decoder).
_DECODER = dict(rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, head_dim=0,
                family="llama", norm="rms", mlp="swiglu", parallel_block=False,
                rotary_fraction=1.0, attention_bias=False, mlp_bias=False, lm_head_bias=False)

_PRESETS = {
    "tiny": dict(
        # 4 px patches: with 8 px ones the tower never learns shape or count (measured).
        vision=dict(kind="clip", image_size=32, patch_size=4, width=64, depth=2, heads=4,
                    mlp_dim=128, feature_layer=-1),
        projector=dict(kind="mlp2x_gelu"),
        decoder=dict(vocab_size=128, width=128, depth=2, heads=4, kv_heads=2, mlp_dim=256),
        image_token_id=128, dtype="float32",
        data=dict(seq_len=80, num_train=20000, num_eval=512),
        train=dict(steps=1000, batch_size=32, log_every=50),
        optim=dict(lr=2e-3, warmup_steps=20, weight_decay=0.0),
        checkpoint=dict(every=250),
    ),
    "1b": dict(  # TinyLlama-1.1B shape.
        vision=_CLIP_L_336,
        decoder=dict(vocab_size=32000, width=2048, depth=22, heads=32, kv_heads=4,
                     mlp_dim=5632),
    ),
    "7b": dict(  # LLaVA-1.5-7B: Vicuna-7B (LLaMA-2-7B shape).
        vision=_CLIP_L_336,
        decoder=dict(vocab_size=32000, width=4096, depth=32, heads=32, kv_heads=32,
                     mlp_dim=11008),
    ),
    "13b": dict(  # LLaVA-1.5-13B: Vicuna-13B.
        vision=_CLIP_L_336,
        decoder=dict(vocab_size=32000, width=5120, depth=40, heads=40, kv_heads=40,
                     mlp_dim=13824),
    ),
    "phi2": dict(
        vision=_CLIP_B_224,
        projector=dict(kind="residual_mlp", depth=2),
        decoder=_PHI2,
        # Phi-2's tokenizer has 50295 ids (GPT-2's 50257 + 38 added whitespace tokens); the
        # table is padded to 51200. 50295 is the id `tokenizer.add_tokens("<image>")` gives,
        # a row that exists but no text token uses: HF LLaVA embeds it without the export
        # growing the table (video/audio take 50296/50297, also unused rows).
        image_token_id=50295,
    ),
}

_STAGES = {
    "full": dict(freeze=()),
    "pretrain": dict(freeze=(r"^towers/", r"^decoder/"), lr=1e-3, task="caption"),
    "finetune": dict(freeze=(r"^towers/",), lr=2e-5, task="qa"),
    # Adapters train whatever `freeze` says (mm_jax.train.state): r"^decoder/" freezes its base.
    "finetune_lora": dict(freeze=(r"^towers/", r"^decoder/"), lr=2e-4, task="qa",
                          lora=dict(rank=8, dropout=0.05)),
    "finetune_qlora": dict(freeze=(r"^towers/", r"^decoder/"), lr=2e-4, task="qa",
                           lora=dict(rank=8, dropout=0.05, base_qtype="nf4"),
                           # QLoRA's bf16 adapters and 16-bit embeddings (tiny: float32)
                           param_dtype="bfloat16"),
}


def _parse(arg: str) -> tuple[str, str]:
  preset, *rest = (arg or "tiny").split(",")
  options = dict(kv.split("=", 1) for kv in rest)
  unknown = set(options) - {"stage"}
  if unknown:
    raise ValueError(f"configs/llava.py: unknown option(s) {sorted(unknown)} in {arg!r}")
  if preset not in _PRESETS:
    raise ValueError(f"configs/llava.py: unknown preset {preset!r}; known {sorted(_PRESETS)}")
  stage = options.get("stage", "full")
  if stage not in _STAGES:
    raise ValueError(f"configs/llava.py: unknown stage {stage!r}; known {sorted(_STAGES)}")
  return preset, stage


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """Every field of mm_jax.config.Config (its typed defaults), then what the preset and the
  stage change: any key can be overridden from any preset (--print_config lists them)."""
  preset_name, stage_name = _parse(arg)
  preset, stage = _PRESETS[preset_name], _STAGES[stage_name]
  big = preset_name != "tiny"
  c = ml_collections.ConfigDict(config_lib.defaults())
  c.name = preset_name
  c.stage = stage_name

  m = c.model
  m.vision.update(preset["vision"])
  m.projector.update(preset.get("projector", {}))
  m.decoder.update({**_DECODER, **preset["decoder"]})
  m.image_token_id = preset.get("image_token_id", 32000)
  # Video and audio stay off in LLaVA presets (configs/mimo.py turns them on).
  m.modalities = ("image",)
  m.video_token_id = m.image_token_id + 1
  m.audio_token_id = m.image_token_id + 2
  m.video.update(num_frames=8, pool=2, tower="shared", projector="separate")
  m.dtype = preset.get("dtype", "bfloat16")
  m.param_dtype = stage.get("param_dtype", "float32") if big else "float32"
  m.remat = "full" if big else "none"  # none | full | dots (models/remat.py)
  m.scan_layers = big  # one scanned block per stack (models/stack.py)

  c.data.update(dict(
      task=stage.get("task", "qa"), seq_len=2048, worker_count=0 if not big else 16,
      template="plain" if stage_name == "pretrain" else "vicuna_v1"))
  c.data.update(preset.get("data", {}))
  c.optim.update(warmup_steps=30)
  c.optim.update(preset.get("optim", {}))
  c.optim.freeze = tuple(stage["freeze"])
  if "lr" in stage and big:  # The tiny model learns from scratch: keep its own lr.
    c.optim.lr = stage["lr"]
  c.train.update(steps=5000, batch_size=128)
  # The loss takes 512 positions of float32 logits at a time: [16, 2048, 32000] of them
  # (4 GiB, and as much again for their gradient) never exist (train/losses.py).
  c.train.loss_chunk = 512 if big else 0
  c.train.update(preset.get("train", {}))
  c.checkpoint.update(preset.get("checkpoint", {}))
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1) if not big else dict(data=1, fsdp=-1, tensor=1))
  # config.init: local Hugging Face folders to start from (mm_jax.interop.hf), e.g.
  # --config.init.llava_from_hf=/ckpt/llava-1.5-7b-hf; the model's shape is then read from
  # the folder (mm_jax.interop.hf_adopt).
  c.generate.max_new_tokens = 16 if not big else 512
  # LoRA (mm_jax.models.lora): off unless a *_lora stage or an override sets the rank.
  c.lora.update(stage.get("lora", {}))
  c.lock()
  return c


def get_sweep(arg: str, h) -> list[dict]:
  """Trials for `--sweep` launches (launch/sweep.py passes itself as `h`).

  tiny: learning rate x warmup around its defaults (2e-3, 20 steps), the schedule of a model
  learning from scratch (6 trials, minutes each on CPU). Larger presets: the stage's
  learning rate halved, kept and doubled (3 trials), the first knob to re-tune on new data.
  """
  lr = get_config(arg).optim.lr  # also rejects a bad arg
  if _parse(arg)[0] == "tiny":
    return h.product(h.sweep("optim.lr", [1e-3, 2e-3, 4e-3]),
                     h.sweep("optim.warmup_steps", [20, 50]))
  return h.sweep("optim.lr", [lr / 2, lr, lr * 2])
