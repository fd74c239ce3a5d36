r"""QLoRA fine-tuning step (issue 8): ours vs transformers + peft + bitsandbytes, one GPU.

  python bench/lora.py                  # 7b,stage=finetune_qlora, sequence 2048, batch 4
  python bench/lora.py --batch=8 --seq_len=4096
  python bench/lora.py --smoke          # tiny,stage=finetune_qlora shapes on CPU (CI)

Ours: `7b,stage=finetune_qlora` as configured (NF4 base in blocks of 64 with float32 scales,
rank-8 bf16 adapters with dropout 0.05 on q/k/v/o/gate/up/down, projector trainable, tower
frozen, remat=full, AdamW) on ONE device, so it shares the peer's GPU. Each row is a BOS,
one image's placeholders, then random text to the full length: every token is real and
the loss covers the text. tokens/s = batch x seq_len / step time.

Timing: the step is one jitted program whose state is donated, so it cannot sit in a
`fori_loop` (bench/timing.py); instead the host enqueues `--steps` steps after `--warmup`
steps, blocks once on the final state, and divides; the median of `--repeats` such runs is
reported. A single call is never timed. The peer runs the same shapes in a subprocess
FIRST, before JAX claims the GPU (it preallocates 75% of it), timed with CUDA events
around the same number of steps.

Peak memory: `peak_bytes_in_use` of our device (JAX cannot reset it) and
`torch.cuda.max_memory_allocated` after the peer's model is built. Beside ours: the
--dry_run estimate (mm_jax/train/memory.py) and XLA's plan for the compiled step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import versions  # noqa: E402
from configs import llava  # noqa: E402
from mm_jax import config as config_lib  # noqa: E402
from mm_jax import sharding  # noqa: E402
from mm_jax.train import batches, memory  # noqa: E402
from mm_jax.train import state as state_lib  # noqa: E402
from mm_jax.train.step import TrainState, train_step  # noqa: E402

GiB = 2**30
PEER_NAME = "transformers + peft + bitsandbytes"
PEER_MODULES = ("torch", "transformers", "peft", "bitsandbytes")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_config(smoke: bool, seq_len: int, batch: int) -> config_lib.Config:
  cd = llava.get_config("tiny,stage=finetune_qlora" if smoke else "7b,stage=finetune_qlora")
  with cd.unlocked():
    cd.data.seq_len = seq_len
    cd.train.batch_size = batch
  return config_lib.from_config_dict(cd)


def row_layout(seq_len: int, per_image: int, vocab: int, batch: int, seed: int = 0
               ) -> np.ndarray:
  """int32[B, T + 1] ids: BOS (1), `per_image` placeholders (-1 here), random text."""
  ids = np.random.default_rng(seed).integers(3, vocab, (batch, seq_len + 1)).astype(np.int32)
  ids[:, 0], ids[:, 1:1 + per_image] = 1, -1
  return ids


def random_batch(cfg: config_lib.Config, batch: int) -> dict[str, np.ndarray]:
  """A training batch with real shapes (pipeline.batch_shapes): one image per row."""
  m, t = cfg.model, cfg.data.seq_len
  per = m.vision.tokens_per_image
  ids = row_layout(t, per, m.decoder.vocab_size, batch)
  ids[ids == -1] = m.image_token_id
  s = m.vision.image_size
  rows = np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t))
  return {"tokens": ids[:, :-1], "targets": ids[:, 1:],
          "loss_mask": rows >= per,  # target t is ids[t + 1]: text from t = per on
          "segment_ids": np.ones((batch, t), np.int32), "positions": rows.copy(),
          "images": np.random.default_rng(1).normal(size=(batch, s, s, 3)).astype(np.float32),
          "image_valid": np.ones(batch, bool)}


def _fill(path, x: jax.ShapeDtypeStruct, key) -> jax.Array:
  """One random leaf. NF4 codes of a normal kernel are uniform over the 16 levels (they are
  its quantiles), so random bytes are what a random base quantises to; 0.05 is about the
  absmax of a block of 64 draws of N(0, 0.02). Norm scales 1, biases and LoRA's B 0."""
  name = str(path[-2].key if isinstance(path[-1], jax.tree_util.GetAttrKey) else path[-1])
  if x.dtype == jnp.uint8:
    return jax.random.bits(key, x.shape, jnp.uint8)
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jax.random.randint(key, x.shape, -127, 128).astype(x.dtype)
  if name == "kernel_scale":
    return jnp.full(x.shape, 0.05, x.dtype)
  if name == "scale":
    return jnp.ones(x.shape, x.dtype)
  if name in ("bias", "lora_b"):
    return jnp.zeros(x.shape, x.dtype)
  return (0.02 * jax.random.normal(key, x.shape)).astype(x.dtype)


def random_state(built: state_lib.Built) -> TrainState:
  """A random train state made leaf by leaf in its shardings. Not `state_lib.initialise`:
  that builds the bf16 base before quantising it, and JAX cannot reset the device's peak
  memory, so the init's transient base (13 GB at 7b) could be reported as the training
  peak. Values are random either way; only shapes and dtypes matter to speed and memory."""
  a, sh = built.abstract, built.shardings

  def make():
    flat, tree = jax.tree_util.tree_flatten_with_path((a.params, a.frozen))
    keys = jax.random.split(jax.random.key(0), len(flat))
    return tree.unflatten([_fill(p, x, k) for (p, x), k in zip(flat, keys, strict=True)])

  params, frozen = jax.jit(make, out_shardings=(sh.params, sh.frozen))()
  opt_state = jax.jit(built.fns.tx.init, out_shardings=sh.opt_state)(params)
  step = jax.device_put(np.zeros((), np.int32), sh.step)
  return TrainState(step=step, params=params, frozen=frozen, opt_state=opt_state)


def _xla_plan_bytes(compiled) -> int | None:
  """Arguments + outputs - donated aliases + temporaries of the compiled step."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def run_ours(cfg: config_lib.Config, warmup: int, steps: int, repeats: int) -> dict:
  device = jax.devices()[0]
  mesh = sharding.make_mesh(cfg.mesh, [device])
  built = state_lib.build(cfg, mesh)
  batch_sh = batches.batch_shardings(mesh, batches.row_spec(cfg), cfg.train.batch_size)
  with jax.set_mesh(mesh):
    local = random_batch(cfg, cfg.train.batch_size)
    batch = {k: jax.device_put(v, batch_sh[k]) for k, v in local.items()}
    state = random_state(built)
    step = jax.jit(lambda s, b: train_step(built.fns, s, b), in_shardings=(built.shardings,
                   batch_sh), out_shardings=(built.shardings, None), donate_argnums=0)
    compiled = step.lower(state, batch).compile()
    for _ in range(warmup):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append((time.perf_counter() - t0) / steps)
  stats = device.memory_stats()
  return {"step_s": statistics.median(times),
          "tokens": int(np.asarray(metrics["tokens"])), "loss": float(metrics["loss"]),
          "peak_bytes": stats.get("peak_bytes_in_use") if stats else None,
          "estimate_bytes": memory.table(cfg, built.abstract)["total"].peak_bytes,
          "xla_bytes": _xla_plan_bytes(compiled)}


# ----------------------------------------------------------------------------- the peer


def peer_shapes(cfg: config_lib.Config, warmup: int, steps: int, repeats: int) -> dict:
  """What the peer needs, read off our config so both run the same model and batch."""
  m = cfg.model
  keep = ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "feature_layer",
          "feature_select", "tokens_per_image")
  dec = ("vocab_size", "width", "depth", "heads", "kv_heads", "mlp_dim", "norm_eps")
  return {"vision": {k: getattr(m.vision, k) for k in keep},
          "decoder": {k: getattr(m.decoder, k) for k in dec},
          "image_token_id": m.image_token_id, "seq_len": cfg.data.seq_len,
          "batch": cfg.train.batch_size, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
          "dropout": cfg.lora.dropout, "block": cfg.lora.block_size, "lr": cfg.optim.lr,
          "clip_norm": cfg.optim.clip_norm, "warmup": warmup, "steps": steps,
          "repeats": repeats}


def peer_model(p: dict, dev: str):
  """LlavaForConditionalGeneration in bf16, random, built on `dev`, with the language
  model's projections swapped for bitsandbytes NF4 layers and LoRA (peft) on them.

  Swapping in place rather than save + `from_pretrained(quantization_config=...)`: no
  checkpoint exists, and a 13 GiB round trip through disk would buy the same layers.
  """
  import peft
  import torch
  import transformers as tf

  v, d = p["vision"], p["decoder"]
  vision = tf.CLIPVisionConfig(hidden_size=v["width"], intermediate_size=v["mlp_dim"],
                               num_hidden_layers=v["depth"], num_attention_heads=v["heads"],
                               image_size=v["image_size"], patch_size=v["patch_size"])
  # llava-hf appends <image> (and <pad>) to the vocabulary, padded to a multiple of 64
  # (32064 for 7b); our table stops at image_token_id and the merge replaces those rows.
  text = tf.LlamaConfig(hidden_size=d["width"], intermediate_size=d["mlp_dim"],
                        num_hidden_layers=d["depth"], num_attention_heads=d["heads"],
                        num_key_value_heads=d["kv_heads"], vocab_size=d["vocab_size"] + 64,
                        rms_norm_eps=d["norm_eps"], max_position_embeddings=max(
                            4096, p["seq_len"]))
  cfg = tf.LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=p["image_token_id"], projector_hidden_act="gelu",
                       vision_feature_layer=v["feature_layer"],
                       vision_feature_select_strategy="default"
                       if v["feature_select"] == "patch" else "full")
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16 (no fp32 copy)
  try:
    with torch.device(dev):
      model = tf.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
  finally:
    torch.set_default_dtype(default)
  model = quantise_language_model(model.to(torch.bfloat16), p["block"], dev)
  # Non-reentrant checkpointing of every layer, as our remat=full (the method was renamed
  # in transformers 5.2x; 4.x has only the old name).
  kw = {"use_reentrant": False}
  if hasattr(model, "activation_checkpointing_enable"):
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
  else:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
  # Full regex: the CLIP tower has q/k/v_proj too, and it stays frozen and adapter-free.
  targets = r".*language_model.*\.(" + "|".join(LORA_TARGETS) + ")"
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=p["rank"], lora_alpha=p["alpha"], lora_dropout=p["dropout"], target_modules=targets))
  for name, param in model.named_parameters():
    if "lora_" in name:  # peft makes float32 adapters; ours (and QLoRA's) are bf16
      param.data = param.data.to(torch.bfloat16)
    if "multi_modal_projector" in name:  # trained in place, as ours (not modules_to_save's copy)
      param.requires_grad_(True)
  return model.train()


def quantise_language_model(model, block: int, dev: str):
  """Every q/k/v/o/gate/up/down nn.Linear of the language model -> bnb Linear4bit, NF4
  in blocks of `block` with plain float32 absmax (no double quantisation: ours stores
  float32 scales), computing in bf16. lm_head stays bf16, as in QLoRA and ours."""
  import bitsandbytes as bnb
  import torch

  for name, mod in list(model.named_modules()):
    if not (isinstance(mod, torch.nn.Linear) and "language_model" in name
            and name.rsplit(".", 1)[-1] in LORA_TARGETS):
      continue
    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                          compute_dtype=torch.bfloat16, compress_statistics=False,
                          quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, blocksize=block,
                                 compress_statistics=False, quant_type="nf4")
    if mod.bias is not None:
      q.bias = torch.nn.Parameter(mod.bias.data, requires_grad=False)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, q.to(dev))  # .to() quantises (bnb)
  return model


def run_peer(p: dict, dev: str = "cuda") -> dict:
  """One QLoRA step of the peer, timed like ours: warm-up, then `steps` steps bracketed by
  CUDA events (a host clock and a final synchronize on CPU), median of `repeats`."""
  import bitsandbytes as bnb
  import peft
  import torch
  import transformers as tf

  model = peer_model(p, dev)
  trainable = [x for x in model.parameters() if x.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=p["lr"], weight_decay=0.0, fused=dev == "cuda")
  v, b, t = p["vision"], p["batch"], p["seq_len"]
  ids = torch.from_numpy(row_layout(t, v["tokens_per_image"], p["decoder"]["vocab_size"], b)
                         [:, :-1].astype(np.int64)).to(dev)
  ids[ids == -1] = p["image_token_id"]
  labels = ids.clone()
  labels[:, :1 + v["tokens_per_image"]] = -100  # loss on the text, as our loss_mask
  pixels = torch.randn(b, 3, v["image_size"], v["image_size"], device=dev,
                       dtype=torch.bfloat16)

  def one():
    loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, p["clip_norm"])  # ours clips at 1.0 too
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  cuda = dev == "cuda"
  if cuda:  # the replaced bf16 weights are gone by now
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # the model is built: count training from here
  for _ in range(p["warmup"]):
    loss = one()
  times = []
  for _ in range(p["repeats"]):
    if cuda:
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
    t0 = time.perf_counter()
    for _ in range(p["steps"]):
      loss = one()
    if cuda:
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end) / 1e3 / p["steps"])
    else:
      times.append((time.perf_counter() - t0) / p["steps"])
  where = torch.cuda.get_device_name() if cuda else "cpu"
  return {"step_s": statistics.median(times), "tokens": b * t, "loss": float(loss),
          "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
          "versions": f"torch {torch.__version__}, transformers {tf.__version__}, peft "
                      f"{peft.__version__}, bitsandbytes {bnb.__version__}, {where}"}


def peer_subprocess(p: dict) -> dict:
  """The peer in a fresh process: {"missing": why} or run_peer's dict or {"failed": why}."""
  missing = [m for m in PEER_MODULES if importlib.util.find_spec(m) is None]
  if missing:
    return {"missing": ", ".join(missing) + " not installed"}
  r = subprocess.run([sys.executable, os.path.abspath(__file__), "--peer", json.dumps(p)],
                     capture_output=True, text=True)
  lines = r.stdout.strip().splitlines()
  if r.returncode or not lines:
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return {"failed": f"exit {r.returncode}: {tail}"}
  return json.loads(lines[-1])


def peer_main(p: dict) -> None:
  import torch

  out = run_peer(p) if torch.cuda.is_available() else {"missing": "torch sees no CUDA device"}
  print(json.dumps(out))


# ----------------------------------------------------------------------------- output


def _gib(n: int | None) -> str:
  """GiB with two decimals; tiny (smoke) sizes in MiB so they do not read as 0.00."""
  if n is None:
    return "n/a"
  return f"{n / GiB:.2f}" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def row(name: str, shape: str, r: dict, estimate: str = "") -> str:
  if "missing" in r or "failed" in r:
    why = f"not run: {r['missing']}" if "missing" in r else f"failed: {r['failed']}"
    return f"| {name} | {shape} | {why} | | | | |"
  return (f"| {name} | {shape} | {r['step_s'] * 1e3:.1f} | {r['tokens'] / r['step_s']:.0f} | "
          f"{_gib(r['peak_bytes'])} | {estimate} | {r['loss']:.3f} |")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=4, help="rows per step on the one device")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run the peer (JSON)
  args = parser.parse_args()
  if args.peer:
    return peer_main(json.loads(args.peer))
  seq, batch = (128, 2) if args.smoke else (args.seq_len, args.batch)
  warmup, steps, repeats = (1, 2, 2) if args.smoke else (args.warmup, args.steps, args.repeats)
  cfg = make_config(args.smoke, seq, batch)
  peer = peer_subprocess(peer_shapes(cfg, warmup, steps, repeats))  # before JAX takes the GPU
  ours = run_ours(cfg, warmup, steps, repeats)
  preset = "tiny" if args.smoke else "7b"
  print(f"# QLoRA step, {preset},stage=finetune_qlora, {versions()}\n")
  print(f"Per step: host loop of {steps} donated steps after {warmup} warm-up, one block at "
        f"the end (peer: CUDA events), median of {repeats}. Peak memory GiB: JAX "
        "peak_bytes_in_use / torch max_memory_allocated.\n")
  print("| impl | batch x seq | step (ms) | tokens/s | peak memory (GiB) | estimate (GiB) | "
        "loss |")
  print("|---|---|---|---|---|---|---|")
  shape = f"{batch} x {seq}"
  estimate = f"dry-run {_gib(ours['estimate_bytes'])}, XLA plan {_gib(ours['xla_bytes'])}"
  print(row("ours (mm_jax)", shape, ours, estimate))
  print(row(PEER_NAME, shape, peer))
  if "versions" in peer:
    print(f"\npeer: {peer['versions']}")


if __name__ == "__main__":
  main()
