"""--dry_run --target: compile the run's steps with the target's own compiler and report.

For a machine that is not here (mm_jax/aot.py) or the local one, the train step exactly as
`loop.train` jits it and the decode step of generation are compiled from shapes alone (no
weights). The report: which Pallas kernels became the target's custom calls (and how many),
compile time, XLA's per-device memory plan against the chip's HBM, and FLOPs per step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import time
import traceback

import jax
import numpy as np
from flax import nnx

from mm_jax import sharding, target
from mm_jax.config import Config
from mm_jax.data import pipeline
from mm_jax.train import metrics
from mm_jax.train import plan as plan_lib

GiB = 2**30
# custom-call targets of compiled Pallas kernels, by backend.
KERNEL_CALLS = {"tpu_custom_call": "Mosaic TPU", "__gpu$xla.gpu.triton": "Triton",
                "mosaic_gpu_v2": "Mosaic GPU", "mosaic_gpu": "Mosaic GPU"}
# cuDNN's fused attention, the GPU baseline `auto` picks (kernels/choice.py).
CUDNN_PREFIX = "__cudnn$fmha"
_CALL = re.compile(r'custom_call_target="([^"]+)"')
_OP = re.compile(r'op_name="([^"]+)"')
_INNER = re.compile(r"^\w+\((.*)\)$")


class CompileFailed(Exception):
  """The target's compiler refused the step: one line naming the kernel or op."""


@dataclasses.dataclass(frozen=True)
class Report:
  what: str  # "train step" | "decode step"
  plan: plan_lib.Plan
  compile_s: float
  kernels: dict[tuple[str, str], int]  # (kernel name, backend) -> custom calls
  flops: float  # model FLOPs per step, derived (metrics.flops_per_step)
  xla_flops: float | None  # XLA's own count, where the backend has one
  note: str | None = None  # how the compile differs from a device's


def kernel_calls(hlo: str) -> dict[tuple[str, str], int]:
  """(kernel, backend) -> how many custom calls of compiled HLO text it became: our Pallas
  kernels by their pallas_call names, cuDNN's fused attention by its call."""
  counts = collections.Counter()
  for line in hlo.splitlines():
    call = _CALL.search(line)
    if call and call[1].startswith(CUDNN_PREFIX):
      counts[(call[1].removeprefix("__cudnn$"), "cuDNN")] += 1
    elif call and call[1] in KERNEL_CALLS:
      op = _OP.search(line)
      counts[(_kernel_name(op[1] if op else ""), KERNEL_CALLS[call[1]])] += 1
  return dict(sorted(counts.items()))


def _kernel_name(op_name: str) -> str:
  """'jit(f)/transpose(jvp(flash_attention_dq))/pallas_call' -> 'flash_attention_dq'."""
  for part in reversed(op_name.split("/")[:-1]):
    while m := _INNER.match(part):
      part = m[1]
    if part:
      return part
  return "?"


def _failure(e: BaseException, what: str) -> CompileFailed:
  """Names the kernel whose lowering raised (the deepest frame in mm_jax/kernels) and the
  compiler's message, e.g. a Mosaic op it rejected."""
  kernel = None
  for frame, _ in traceback.walk_tb(e.__traceback__):
    if "/mm_jax/kernels/" in frame.f_code.co_filename:
      kernel = frame.f_code.co_name
  text = str(e).strip()
  first = text.splitlines()[0] if text else type(e).__name__
  op = re.search(r'"(tpu\.[\w.]+|mosaic_gpu\.[\w.]+|triton\.[\w.]+)"', text)
  where = f" in kernel {kernel}" if kernel else ""
  detail = f" (op {op[1]})" if op else ""
  return CompileFailed(f"{what}: compile failed{where}: {type(e).__name__}: {first[:300]}"
                       f"{detail}")


# Without a device XLA's GPU compiler cannot autotune GEMMs and gives each Triton GEMM fusion
# a default tiling, which some shapes do not admit (a device would autotune one that does).
_NO_TILING = "Couldn't find output tile sizes"


def _compile(lowered_fn, mesh, what: str):
  """(compiled, seconds, note): on GPU, a GEMM no default Triton tiling fits is compiled
  again with GEMMs through cuBLAS, and the note says so."""
  t0, note = time.perf_counter(), None
  try:
    with jax.set_mesh(mesh):
      lowered = lowered_fn()
      try:
        compiled = lowered.compile()
      except Exception as e:  # noqa: BLE001 - retried once, else reported below
        if _NO_TILING not in str(e) or target.Target.of_mesh(mesh).platform != "gpu":
          raise
        compiled = lowered.compile({"xla_gpu_enable_triton_gemm": False})
        dot = re.search(r"(%[\w.]+ = \w+\[[\d,]*\])", str(e))
        note = ("GEMMs through cuBLAS: without autotuning XLA found no Triton tiling for "
                f"{dot[1] if dot else 'a dot'}")
  except Exception as e:  # noqa: BLE001 - reported in one line naming the kernel
    raise _failure(e, what) from e
  return compiled, time.perf_counter() - t0, note


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - GPU has none
    return None
  cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def train_step(cfg: Config, mesh: jax.sharding.Mesh, built=None) -> Report:
  from mm_jax.train import batches
  from mm_jax.train import state as state_lib

  built = built or state_lib.build(cfg, mesh)
  compiled, seconds, note = _compile(lambda: plan_lib.lower_train_step(cfg, mesh, built),
                                     mesh, "train step")
  spec = batches.row_spec(cfg)
  counts = state_lib.param_counts(built.abstract)
  flops = metrics.flops_per_step(cfg.model, cfg.train.batch_size, spec.seq_len,
                                 cfg.train.batch_size * spec.images_per_sample, counts,
                                 state_lib.trainable_modules(built.abstract))
  return Report("train step", plan_lib.Plan.of(compiled, mesh.size), seconds,
                kernel_calls(compiled.as_text()), flops, _xla_flops(compiled), note)


def decode_batch(cfg: Config, mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """(rows, prompt length) of the decode compile: one prompt per data-parallel device, as
  long as seq_len leaves room for max_new_tokens (multiple of 8, as left_pad pads)."""
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  prompt = max(8, (cfg.data.seq_len - cfg.generate.max_new_tokens) // 8 * 8)
  return rows, prompt


def decode_step(cfg: Config, mesh: jax.sharding.Mesh) -> Report:
  """Prefill + the decode loop of generation (infer/generate.py) for `decode_batch` rows."""
  from mm_jax.infer import generate
  from mm_jax.models import lora
  from mm_jax.models.multimodal import MultimodalModel, resolve_backends
  from mm_jax.train import batches

  model_cfg = resolve_backends(cfg.model, target.Target.of_mesh(mesh))
  make = lambda: lora.apply(MultimodalModel(model_cfg, rngs=nnx.Rngs(0)), cfg.lora, 0)
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  shardings = sharding.state_shardings(abstract, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  rows, prompt = decode_batch(cfg, mesh)
  shapes = {k: v for k, v in pipeline.batch_shapes(batches.row_spec(cfg), rows).items()
            if k not in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
  shapes.update(tokens=((rows, prompt), np.int32), positions=((rows, prompt), np.int32),
                token_valid=((rows, prompt), np.bool_), lengths=((rows,), np.int32))
  batch = {k: jax.ShapeDtypeStruct(shape, dtype,
                                   sharding=sharding.batch_sharding(mesh, len(shape)))
           for k, (shape, dtype) in shapes.items()}
  g = cfg.generate
  settings = generate.Decoding(g.max_new_tokens, g.temperature, g.top_k, g.top_p, (2,), 0)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                             sharding=jax.sharding.NamedSharding(mesh, jax.P()))
  fn = jax.jit(functools.partial(generate.decode, graphdef, settings))
  compiled, seconds, note = _compile(lambda: fn.lower(state, batch, key), mesh, "decode step")
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  flops = 2.0 * params * rows * (prompt + g.max_new_tokens)  # 2 N per token, no attention
  return Report("decode step", plan_lib.Plan.of(compiled, mesh.size), seconds,
                kernel_calls(compiled.as_text()), flops, _xla_flops(compiled), note)


def _size(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def format_report(report: Report, tgt: target.Target) -> list[str]:
  p = report.plan
  lines = [f"{report.what}: compiled for {tgt.name} in {report.compile_s:.1f} s"]
  if report.note:
    lines.append(f"  note: {report.note}")
  if report.kernels:
    lines += [f"  kernel {name}: {n} {backend} custom call(s)"
              for (name, backend), n in report.kernels.items()]
  elif tgt.platform == "cpu":
    lines.append("  kernels: none compiled (CPU target: Pallas would run in the interpreter; "
                 "--target=NAME compiles for a TPU or GPU)")
  else:
    lines.append("  kernels: none (XLA's attention and merge here)")
  lines.append(f"  per device: argument {_size(p.argument)}, output {_size(p.output)}, alias "
               f"{_size(p.alias)}, temp {_size(p.temp)}: total {_size(p.total)}")
  how = ("2 N per token forward, 4 N backward for trained modules, plus attention"
         if report.what == "train step" else "2 N per prompt or generated token, no attention")
  flops = f"  FLOPs per step: {report.flops:.3e} (model FLOPs, derived: {how})"
  if report.xla_flops is not None:
    flops += (f"; XLA counts {report.xla_flops:.3e} per device (a scanned layer body once, "
              "a Pallas kernel as 0)")
  lines.append(flops)
  return lines


def verdict(name: str, reports: list[Report], tgt: target.Target) -> tuple[str, bool]:
  """The closing line, 'mm_jax: NAME: P GiB per chip of H GiB: fits', and whether it fits
  (the largest plan of the steps compiled against the chip's HBM)."""
  peak = max(r.plan.total for r in reports)
  hbm = tgt.hbm_bytes
  if hbm is None:
    return (f"mm_jax: {name}: {peak / GiB:.2f} GiB per device (CPU: no HBM to fit)", True)
  fits = peak <= hbm
  return (f"mm_jax: {name}: {peak / GiB:.2f} GiB per chip of {hbm / GiB:.1f} GiB: "
          f"{'fits' if fits else 'does not fit'}", fits)
