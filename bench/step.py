r"""The whole train step (issue 21, item 5): tokens/s, step time, MFU and peak memory, ours
beside the same model in Hugging Face transformers.

  python bench/step.py                                  # GPU: 1b, stage=finetune, 8 x 2048
  python bench/step.py --batch=16                       # GPU, another batch
  taskset -c 0,1 python bench/step.py --shape=small     # CPU: D 256 x L 4, B x T 8 x 256
  taskset -c 0,1 python bench/step.py --shape=tiny      # CPU: the tiny preset, 32 x 80
  taskset -c 0,1 python bench/step.py --shape=small --malloc=keep   # glibc keeps freed memory
  taskset -c 0,1 python bench/step.py --shape=small --profile       # where the time goes
  python bench/step.py --smoke                          # tiny shapes, few steps (CI)

Shape letters: B rows per step, T sequence, D decoder width, L decoder layers, V vocabulary,
P image patches (+ CLIP's class token), one image per row.

Ours: `train_step` (mm_jax/train/step.py) jitted as mm_jax/train/loop.py does, state
donated, on ONE device. The step is one program whose state is donated, so it cannot sit
in a `fori_loop` (bench/timing.py): the host enqueues `--steps` steps, blocks once on the
final state, and divides. A single call is never timed. Each row is a BOS, one image's
placeholders, then random text to the full length (bench/lora.py's batch): every token is
real, tokens/s = B x T / step time, and the loss covers the text.

GPU (jax.default_backend() != "cpu"): `1b,stage=finetune` (tower frozen, as the peer's
LLaVA stage 2; bf16 compute over float32 parameters, remat=full) beside
../shared/peers/hf_llava_step.py (transformers + torch.compile: bf16 parameters, AdamW, no
clipping; median of its own 10 single steps), run FIRST in a subprocess before JAX claims
the GPU. MFU = our count of the step's model FLOPs (mm_jax/train/metrics.py
flops_per_step, used for both) / step time / the device's dense bf16 peak.

CPU: the same model in transformers (LlavaForConditionalGeneration from
mm_jax/interop/hf_export.py's llava_config of our config: float32, sdpa attention),
torch.optim.AdamW + clip_grad_norm_ at our clip norm, the same batch (tokens with image
placeholders, images; cross entropy over our targets and loss mask), in a worker
subprocess with as many torch threads as this process may use (what XLA's CPU client
uses). Blocks alternate in one run: ours `--steps` steps, the worker's `--steps` steps
(the order flips every repeat), `--repeats` times; medians per side, and ours /
transformers as the ratio of the medians beside the range of the per-repeat ratios. Each
process idles on a pipe while the other runs, so neither's threads spin on the cores the
other is using. Page faults per step are each process's own (getrusage). `--profile` times
parts of both steps the same way and prints an op census of our optimized HLO.

`--malloc=keep` (both sides): glibc serves every allocation from its one main heap and
never returns freed memory to the kernel. XLA:CPU allocates a step's temporaries at each
execution and frees them at its end; by default glibc maps those big blocks fresh from the
kernel (mmap, or a per-thread arena it trims), so every step page-faults its whole
working set again and the kernel zeroes it.

Peak memory: the device's `peak_bytes_in_use` (JAX cannot reset it) where it has one;
else (CPU) XLA's plan of the compiled step, labelled as a plan: arguments + outputs -
donated aliases + temporaries. The GPU peer's torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.lora import random_batch  # noqa: E402
from bench.timing import versions  # noqa: E402
from configs import llava  # noqa: E402
from mm_jax import config as config_lib  # noqa: E402
from mm_jax import sharding  # noqa: E402
from mm_jax.train import batches, metrics  # noqa: E402
from mm_jax.train import state as state_lib  # noqa: E402
from mm_jax.train.step import token_losses, train_step  # noqa: E402

GiB = 2**30
PEER_GPU = "transformers + torch.compile"
PEER_CPU = "transformers (eager)"
# The GPU peer, relative to the repository root (../shared beside a checkout; shared/ in
# the device's copy of the working tree).
PEER_PATHS = ("../shared/peers/hf_llava_step.py", "shared/peers/hf_llava_step.py")

# CPU shapes: decoder overrides of the tiny preset, B, T. `small` widens the decoder to
# D 256 (4 heads of 64, 2 kv heads, MLP 512) x L 4 at T 256; the tower stays tiny's
# (32 px, 4 px patches: P 64 + 1, width 64, 2 layers) and so does V (128).
SHAPES = {
    "small": (dict(width=256, depth=4, heads=4, kv_heads=2, mlp_dim=512), 8, 256),
    "tiny": ({}, 32, 80),
}


def keep_freed_memory() -> bool:
  """--malloc=keep: one glibc heap for every thread, no mmap'd blocks, no trimming, so
  what a step frees is what the next one reuses. Call before any thread allocates (the
  arena limit binds threads that have none yet). False where libc has no mallopt."""
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  if not hasattr(libc, "mallopt"):
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's <malloc.h>
  return bool(libc.mallopt(m_arena_max, 1) and libc.mallopt(m_mmap_max, 0)
              and libc.mallopt(m_trim_threshold, 2**31 - 1))


def minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def make_config(preset: str, decoder: dict, batch: int, seq_len: int,
                image_token_id: int | None = None) -> config_lib.Config:
  cd = llava.get_config(preset)
  with cd.unlocked():
    cd.model.decoder.update(decoder)
    if image_token_id is not None:
      cd.model.image_token_id = image_token_id
      cd.model.video_token_id, cd.model.audio_token_id = image_token_id + 1, image_token_id + 2
    cd.data.seq_len = seq_len
    cd.train.batch_size = batch
  return config_lib.from_config_dict(cd)


def step_flops(cfg: config_lib.Config, abstract) -> float:
  """Model FLOPs of one step (one image per row), trained and frozen modules as built."""
  b = cfg.train.batch_size
  return metrics.flops_per_step(cfg.model, b, cfg.data.seq_len, b,
                                state_lib.param_counts(abstract),
                                state_lib.trainable_modules(abstract))


def _plan_bytes(compiled) -> int | None:
  """XLA's plan of the compiled step: arguments + outputs - donated aliases + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


class Ours:
  """Our train step on one device, compiled once; `run(n)` times n donated steps."""

  def __init__(self, cfg: config_lib.Config):
    self.cfg = cfg
    self.device = jax.devices()[0]
    self.mesh = sharding.make_mesh(cfg.mesh, [self.device])
    self.built = built = state_lib.build(cfg, self.mesh)
    b = cfg.train.batch_size
    batch_sh = batches.batch_shardings(self.mesh, batches.row_spec(cfg), b)
    self.local = random_batch(cfg, b)
    with jax.set_mesh(self.mesh):
      self.batch = {k: jax.device_put(v, batch_sh[k]) for k, v in self.local.items()}
      self.state = state_lib.initialise(built)
      step = jax.jit(lambda s, x: train_step(built.fns, s, x),
                     in_shardings=(built.shardings, batch_sh),
                     out_shardings=(built.shardings, None), donate_argnums=0)
      self.compiled = step.lower(self.state, self.batch).compile()
    self.first_loss = None
    self.flops = step_flops(cfg, built.abstract)
    self.faults: list[float] = []  # minor page faults per step, one entry per block

  def run(self, n: int) -> float:
    """Seconds per step over n steps enqueued back to back, one block at the end. The
    very first call's loss (before any update) is kept and that call is not timed."""
    with jax.set_mesh(self.mesh):
      if self.first_loss is None:
        self.state, m = self.compiled(self.state, self.batch)
        self.first_loss = float(m["loss"])
        n -= 1
      n = max(n, 1)
      f0, t0 = minor_faults(), time.perf_counter()
      for _ in range(n):
        self.state, m = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, m))
      dt = (time.perf_counter() - t0) / n
    self.faults.append((minor_faults() - f0) / n)
    return dt

  def peak(self) -> tuple[int | None, str]:
    stats = self.device.memory_stats()
    if stats and stats.get("peak_bytes_in_use"):
      return stats["peak_bytes_in_use"], "peak_bytes_in_use"
    return _plan_bytes(self.compiled), "XLA plan"


def interleave(a, b, warmup: int, steps: int, repeats: int) -> tuple[list, list]:
  """Per-step seconds of `a(n)` and `b(n)` over `repeats` alternating blocks (the order
  flips every repeat, so neither always follows the other), after a warm-up block each."""
  a(warmup)
  b(warmup)
  ta, tb = [], []
  for r in range(repeats):
    for run, times in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
      times.append(run(steps))
  return ta, tb


# ----------------------------------------------------------------------------- CPU peer


def hf_config(cfg: config_lib.Config) -> dict:
  """Our model as a transformers LlavaConfig dict (the export's own, float32)."""
  from mm_jax.interop import hf_export

  special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
  return hf_export.llava_config(cfg.model, "float32", special, cfg.data.seq_len)


class TorchWorker:
  """The transformers side in its own process: one JSON line per command on a pipe."""

  def __init__(self, cfg: config_lib.Config, local: dict, threads: int, workdir: str,
               malloc: str):
    path = os.path.join(workdir, "batch.npz")
    np.savez(path, **local)
    o = cfg.optim
    spec = {"hf": hf_config(cfg), "batch": path, "threads": threads, "lr": o.lr,
            "betas": [o.b1, o.b2], "eps": o.eps, "weight_decay": o.weight_decay,
            "clip_norm": o.clip_norm, "malloc": malloc,
            "freeze_tower": any(p.startswith("^towers") for p in o.freeze)}
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                  json.dumps(spec)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1)
    hello = self._read()
    self.versions, self.first_loss = hello["versions"], hello["loss"]
    self.faults: list[float] = []

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the torch worker exited ({self.proc.wait()})")
    return json.loads(line)

  def run(self, n: int, part: str = "step") -> float:
    self.proc.stdin.write(json.dumps({"part": part, "steps": n}) + "\n")
    out = self._read()
    self.faults.append(out["faults"])
    return out["step_s"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def worker_main(spec: dict) -> None:
  """Builds the model and batch, reports the first step's loss, then serves commands
  {"part": step|grad|forward|text_grad|tower_grad|optimizer, "steps": n} with
  {"step_s", "faults"} per call of that part."""
  if spec["malloc"] == "keep":
    keep_freed_memory()
  import torch
  import torch.nn.functional as F
  import transformers as tf

  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  model = tf.LlavaForConditionalGeneration._from_config(
      tf.LlavaConfig(**spec["hf"]), attn_implementation="sdpa", dtype=torch.float32).train()
  if spec["freeze_tower"]:
    model.model.vision_tower.requires_grad_(False)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=spec["lr"], betas=tuple(spec["betas"]),
                          eps=spec["eps"], weight_decay=spec["weight_decay"])
  data = np.load(spec["batch"])
  ids = torch.from_numpy(data["tokens"].astype(np.int64))
  pixels = torch.from_numpy(np.ascontiguousarray(data["images"].transpose(0, 3, 1, 2)))
  labels = torch.from_numpy(np.where(data["loss_mask"], data["targets"], -100).astype(np.int64))
  text_ids = torch.where(ids == model.config.image_token_index, 0, ids)

  def loss_of(logits):  # as ours: mean cross entropy over the loss mask, in float32
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

  def grad():
    loss = loss_of(model(input_ids=ids, pixel_values=pixels).logits)
    loss.backward()
    return loss

  def step():
    loss = grad()
    torch.nn.utils.clip_grad_norm_(trainable, spec["clip_norm"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  def forward():
    with torch.no_grad():
      return loss_of(model(input_ids=ids, pixel_values=pixels).logits)

  def text_grad():  # no tower, no merge: the decoder and loss alone
    loss = loss_of(model(input_ids=text_ids).logits)
    loss.backward()
    return loss

  def tower_grad():  # tower + projector forward and backward
    feats = model.model.get_image_features(pixel_values=pixels).pooler_output
    torch.cat(list(feats), 0).sum().backward()

  def optimizer():  # clip + AdamW on the gradients the last backward left
    torch.nn.utils.clip_grad_norm_(trainable, spec["clip_norm"])
    opt.step()

  parts = {"step": step, "grad": grad, "forward": forward, "text_grad": text_grad,
           "tower_grad": tower_grad, "optimizer": optimizer}
  first = float(step())
  out = {"loss": first, "versions": f"torch {torch.__version__}, transformers "
                                    f"{tf.__version__}, {torch.get_num_threads()} threads"}
  print(json.dumps(out), flush=True)
  for line in sys.stdin:
    cmd = json.loads(line)
    part, n = cmd["part"], max(cmd["steps"], 1)
    if part == "optimizer":
      opt.zero_grad(set_to_none=True)
      grad()  # gradients to update with (not timed)
    f0, t0 = minor_faults(), time.perf_counter()
    for _ in range(n):
      parts[part]()
      if part in ("grad", "text_grad", "tower_grad"):
        opt.zero_grad(set_to_none=True)  # as a step does: the next backward allocates anew
    dt = (time.perf_counter() - t0) / n
    print(json.dumps({"step_s": dt, "faults": (minor_faults() - f0) / n}), flush=True)


# ----------------------------------------------------------------------------- output


def _mem(n: int | None) -> str:
  if n is None:
    return "n/a"
  return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def cpu_model() -> str:
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return "unknown CPU"


def threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _ratio(ours: list[float], theirs: list[float]) -> str:
  pairs = [a / b for a, b in zip(ours, theirs, strict=True)]
  return (f"{statistics.median(ours) / statistics.median(theirs):.2f}x "
          f"(per repeat {min(pairs):.2f}-{max(pairs):.2f})")


def table_row(name: str, shape: str, step_s: float | None, tokens: int, flops: float,
              peak: str, extra: str, loss: str, peak_flops: float | None = None,
              unit: float = 1e12, note: str = "") -> str:
  if step_s is None:
    return f"| {name} | {shape} | {note} | | | | | | |"
  mfu = f"{flops / step_s / peak_flops:.1%}" if peak_flops else "n/a"
  return (f"| {name} | {shape} | {step_s * 1e3:.1f} | {tokens / step_s:,.0f} | "
          f"{flops / step_s / unit:.1f} | {mfu} | {peak} | {extra} | {loss} |")


def header(unit: str, extra: str) -> str:
  """The table head; `unit` TFLOP/s on a GPU, GFLOP/s on CPU."""
  return (f"| impl | B x T | step (ms) | tokens/s | model {unit} | MFU | peak memory | "
          f"{extra} | first loss |\n|---|---|---|---|---|---|---|---|---|")


# ----------------------------------------------------------------------------- CPU


def cpu_main(args, shape: str) -> None:
  decoder, b, t = SHAPES[shape]
  b = args.batch or b
  if args.vocab:  # the image placeholder id stays just past the vocabulary, as in tiny
    decoder = {**decoder, "vocab_size": args.vocab}
  cfg = make_config("tiny", decoder, b, t, image_token_id=args.vocab or None)
  n = threads()
  load0 = os.getloadavg()[0]
  ours = Ours(cfg)
  with tempfile.TemporaryDirectory() as tmp:
    peer = TorchWorker(cfg, ours.local, n, tmp, args.malloc)
    try:
      t_ours, t_peer = interleave(ours.run, peer.run, args.warmup, args.steps, args.repeats)
      f_ours, f_peer = ours.faults[1:], peer.faults[1:]  # past the warm-up blocks
      profile = cpu_profile(ours, peer, args) if args.profile else None
    finally:
      peer.close()
  m, d, v = cfg.model, cfg.model.decoder, cfg.model.vision
  print(f"# Train step on CPU, shape {shape}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}\n")
  # Other jobs on these cores slow torch's OpenMP team far more than XLA (each parallel
  # region waits for every thread of the team): a run under load says so.
  print(f"{cpu_model()}, {n} threads each side; {versions()}; {peer.versions}; "
        f"--malloc={args.malloc}; 1-min load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end.\n")
  print(f"Model: decoder D {d.width} x L {d.depth}, {d.heads} heads ({d.kv_heads} kv), MLP "
        f"{d.mlp_dim}, V {d.vocab_size}; CLIP tower {v.image_size} px / {v.patch_size} px "
        f"patches (P {v.num_patches} + 1), width {v.width} x {v.depth}, mlp2x_gelu; "
        f"{m.dtype} compute, {m.param_dtype} parameters, AdamW + clip {cfg.optim.clip_norm}, "
        f"all trained.\n")
  print(f"Per step: blocks of {args.steps} steps after {args.warmup} warm-up, ours and "
        f"transformers alternating (order flipped each repeat), median of {args.repeats}. "
        "Peak memory: XLA's plan of the compiled step (transformers: not measured).\n")
  print(header("GFLOP/s", "page faults / step"))
  plan, label = ours.peak()
  tokens, shp = b * t, f"{b} x {t}"
  med = lambda xs: f"{statistics.median(xs):,.0f}"
  print(table_row("ours (mm_jax)", shp, statistics.median(t_ours), tokens, ours.flops,
                  f"{_mem(plan)} ({label})", med(f_ours), f"{ours.first_loss:.3f}",
                  unit=1e9))
  print(table_row(PEER_CPU, shp, statistics.median(t_peer), tokens, ours.flops, "n/a",
                  med(f_peer), f"{peer.first_loss:.3f}", unit=1e9))
  print(f"\nours / transformers, step time: {_ratio(t_ours, t_peer)}; first-step losses "
        f"beside ln(V) = {np.log(d.vocab_size):.3f}.")
  if profile:
    print(profile)


def _masked_loss(fns, params, frozen, batch):
  """The step's loss (mean cross entropy over the loss mask), without its gradient."""
  ce, _ = token_losses(fns, params, frozen, batch)
  m = batch["loss_mask"]
  return jnp.where(m, ce, 0.0).sum() / jnp.maximum(m.sum(), 1)


def _host_loop(fn, *args) -> callable:
  """run(n): seconds per call of jitted `fn(*args)` over n calls, one block at the end."""
  def run(n):
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n
  return run


def cpu_profile(ours: Ours, peer: TorchWorker, args) -> str:
  """Parts of both steps, each timed as the whole step is (interleaved, medians), a knob
  of ours alone, and an op census of our compiled step's optimized HLO."""
  from flax import nnx

  from mm_jax.models import attention
  from mm_jax.models.multimodal import resolve_backends

  rows = ["\n## Profile: parts of the step (ms per call, medians)\n",
          "| part | ours | transformers | ours / transformers |", "|---|---|---|---|"]
  med = {}

  def compare(name, run, part):
    a, b = interleave(run, lambda n: peer.run(n, part), args.warmup, args.steps, args.repeats)
    med[part] = statistics.median(a), statistics.median(b)
    rows.append(f"| {name} | {med[part][0] * 1e3:.1f} | {med[part][1] * 1e3:.1f} | "
                f"{_ratio(a, b)} |")

  compare("whole step", ours.run, "step")
  # The step donates its state: the parts below read the state it left and donate nothing.
  fns, state, batch = ours.built.fns, ours.state, ours.batch
  params, frozen = state.params, state.frozen
  text = {k: v for k, v in batch.items() if k not in ("images", "image_valid")}
  loss = lambda p, x: _masked_loss(fns, p, frozen, x)

  def tower(p):
    model = nnx.merge(fns.graphdef, p, frozen)
    return model.projectors["image"](model.towers["image"](batch["images"])).sum()

  grads = jax.jit(jax.grad(loss))(params, batch)
  update = jax.jit(lambda g, o, p: fns.tx.update(g, o, p))
  compare("forward (loss; torch under no_grad)", _host_loop(jax.jit(loss), params, batch),
          "forward")
  compare("forward + backward", _host_loop(jax.jit(jax.grad(loss)), params, batch), "grad")
  compare("optimizer (clip + AdamW)", _host_loop(update, grads, state.opt_state, params),
          "optimizer")
  compare("text only fwd + bwd (no tower, no merge)",
          _host_loop(jax.jit(jax.grad(loss)), params, text), "text_grad")
  compare("tower + projector fwd + bwd", _host_loop(jax.jit(jax.grad(tower)), params),
          "tower_grad")
  (fo, ft), (go, gt) = med["forward"], med["grad"]
  rows.append(f"| backward (fwd + bwd - fwd) | {(go - fo) * 1e3:.1f} | {(gt - ft) * 1e3:.1f} "
              f"| {(go - fo) / (gt - ft):.2f}x |")

  # A knob of ours alone, forward + backward: the segment mask off (causal only). Each jit
  # traces at its first call and keeps that trace: the patch is on only for that call.
  base = _host_loop(jax.jit(jax.grad(loss)), params, batch)
  base(1)
  keep = attention.segment_mask
  attention.segment_mask = lambda q, k: None
  try:
    no_mask = _host_loop(jax.jit(jax.grad(loss)), params, batch)
    no_mask(1)
  finally:
    attention.segment_mask = keep
  a, b = interleave(base, no_mask, args.warmup, args.steps, args.repeats)
  resolved = resolve_backends(ours.cfg.model)
  rows += ["\n| ours, forward + backward | ms |", "|---|---|",
           f"| as built (segment mask + causal) | {statistics.median(a) * 1e3:.1f} |",
           f"| causal only (segment mask off) | {statistics.median(b) * 1e3:.1f} |",
           f"\nBackends as resolved here: attention={resolved.attention}, "
           f"merge={resolved.merge} (`auto` is xla on CPU: model.attention=xla is the same "
           "program)."]
  rows.append(hlo_census(ours.compiled.as_text(), args.hlo_out))
  return "\n".join(rows)


def hlo_census(hlo: str, path: str | None) -> str:
  """Counts of the ops in the optimized HLO that cost time or memory traffic."""
  if path:
    with open(path, "w") as f:
      f.write(hlo)
  ops = re.findall(r"= (\w+)\[[\d,]*\]\S* ([a-z][\w-]*)\(", hlo)
  count: dict[str, int] = {}
  for _, op in ops:
    count[op] = count.get(op, 0) + 1
  keep = ("fusion", "dot", "convolution", "convert", "transpose", "copy", "custom-call",
          "while", "scatter", "gather", "sort", "reduce")
  census = ", ".join(f"{k} {count[k]}" for k in keep if k in count)
  kinds = {k: hlo.count(f"kind={k}") for k in ("kLoop", "kInput", "kOutput", "kCustom")}
  half = sum(1 for dtype, op in ops if op == "convert" and dtype in ("bf16", "f16"))
  where = f" (written to {path})" if path else ""
  return (f"\nOptimized HLO of the step{where}: {census}; fusion kinds "
          f"{ {k: v for k, v in kinds.items() if v} }; converts to bf16/f16: {half}; "
          f"host callbacks: {hlo.count('callback')}.")


# ----------------------------------------------------------------------------- GPU


def find_peer(path: str | None) -> str | None:
  for p in [path] if path else [os.path.join(ROOT, q) for q in PEER_PATHS]:
    if p and os.path.isfile(p):
      return p
  return None


def gpu_peer(path: str | None, batch: int, smoke: bool) -> dict:
  """The peer script in a subprocess, its one result line parsed."""
  if path is None:
    print("peer not found", flush=True)
    return {"note": "peer not found"}
  cmd = ["python3", path, "--batch", str(batch), "--compile"] + (["--tiny"] if smoke else [])
  r = subprocess.run(cmd, capture_output=True, text=True)
  out = (r.stdout or "").strip().splitlines()
  line = out[-1] if out else ""
  # Printed now: if our side then runs out of time, the peer's figure still came back.
  print(f"peer: {' '.join(cmd)}\npeer: {line or 'no output'}", flush=True)
  match = re.search(r"batch=(\d+) seq=(\d+).* ([\d.]+) ms\s+\d+ tok/s.*peak mem ([\d.]+) GiB"
                    r"\s+loss (\S+)", line)
  if r.returncode or not match:
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return {"note": f"failed: exit {r.returncode}: {tail}"}
  b, t, ms, mem, loss = match.groups()
  return {"step_s": float(ms) / 1e3, "peak": float(mem) * GiB, "loss": loss,
          "shape": (int(b), int(t))}  # its own: the 1b shape, or --tiny's under --smoke


def gpu_main(args) -> None:
  b, t = (2, 128) if args.smoke else (args.batch or 8, 2048)
  preset = "tiny" if args.smoke else "1b,stage=finetune"
  cfg = make_config(preset, {}, b, t)
  peer = gpu_peer(find_peer(args.peer_path), b, args.smoke)  # before JAX takes the GPU
  ours = Ours(cfg)
  ours.run(args.warmup)
  times = [ours.run(args.steps) for _ in range(args.repeats)]
  peak_flops = metrics.peak_flops_per_device()
  peak, label = ours.peak()
  print(f"\n# Train step, {preset}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}, {versions()}\n")
  print(f"Ours: host loop of {args.steps} donated steps after {args.warmup} warm-up, one "
        f"block at the end, median of {args.repeats}; {cfg.model.dtype} compute, "
        f"{cfg.model.param_dtype} parameters, remat={cfg.model.remat}, AdamW + clip. Peer: "
        f"{PEER_GPU} (bf16 parameters, AdamW, no clip), median of its single steps. MFU: "
        "our FLOP count of the step for both.\n")
  print(header("TFLOP/s", "XLA plan"))
  shp, tokens = f"{b} x {t}", b * t
  print(table_row("ours (mm_jax)", shp, statistics.median(times), tokens, ours.flops,
                  f"{_mem(peak)} ({label})", _mem(_plan_bytes(ours.compiled)),
                  f"{ours.first_loss:.3f}", peak_flops))
  pb, pt = peer.get("shape", (b, t))
  print(table_row(PEER_GPU, f"{pb} x {pt}", peer.get("step_s"), pb * pt, ours.flops,
                  _mem(peer.get("peak")) + " (max_memory_allocated)", "", peer.get("loss", ""),
                  peak_flops, note=peer.get("note", "")))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="CPU shape")
  parser.add_argument("--batch", type=int, default=0, help="rows per step (0: the shape's)")
  parser.add_argument("--vocab", type=int, default=0, help="CPU: V (0: the shape's, 128)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=0, help="timed blocks (0: CPU 9, GPU 3)")
  parser.add_argument("--malloc", choices=("system", "keep"), default="system",
                      help="CPU: keep = glibc reuses freed memory (module docstring)")
  parser.add_argument("--profile", action="store_true", help="CPU: time parts of the step")
  parser.add_argument("--hlo_out", help="--profile: write our optimized HLO here")
  parser.add_argument("--peer_path", help="GPU: the peer script (default: ../shared/peers)")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the torch side (JSON)
  args = parser.parse_args()
  if args.worker:
    return worker_main(json.loads(args.worker))
  if args.malloc == "keep" and not keep_freed_memory():  # before JAX starts its threads
    print("--malloc=keep: this libc has no mallopt; running with the system's", flush=True)
  cpu = jax.default_backend() == "cpu"
  args.repeats = args.repeats or (9 if cpu else 3)
  if args.smoke:
    args.warmup, args.steps, args.repeats = 1, 2, 2
  if not cpu:
    return gpu_main(args)
  if args.smoke:
    args.batch = args.batch or 4
  return cpu_main(args, "tiny" if args.smoke else args.shape)


if __name__ == "__main__":
  main()
