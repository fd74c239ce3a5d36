"""run(): mesh -> data -> state -> restore -> loop -> hooks. Reads top to bottom."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from mm_jax import config as config_lib
from mm_jax import sharding
from mm_jax.config import Config
from mm_jax.data import pipeline, skips
from mm_jax.train import base as base_lib
from mm_jax.train import metrics as metrics_lib
from mm_jax.train import state as state_lib
from mm_jax.train.checkpoint import Checkpointer
from mm_jax.train.step import eval_step, train_step


def batch_shardings(mesh, spec: pipeline.RowSpec, batch: int) -> dict:
  return {k: sharding.batch_sharding(mesh, len(shape))
          for k, (shape, _) in pipeline.batch_shapes(spec, batch).items()}


def row_spec(cfg: Config) -> pipeline.RowSpec:
  return pipeline.RowSpec.create(cfg.data, cfg.model)


def write_config(cfg: Config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_lib.to_dict(cfg), f, indent=2)


def check_batch(cfg: Config, mesh) -> None:
  """Every micro-batch must split evenly over the data-parallel devices (else XLA
  reshuffles rows between devices on every step)."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = cfg.train.batch_size // cfg.optim.grad_accum
  if micro % dp:
    raise config_lib.ConfigError(
        f"config.optim.grad_accum: micro-batch {micro} (train.batch_size "
        f"{cfg.train.batch_size} / {cfg.optim.grad_accum}) not divisible by {dp} "
        "data-parallel devices (mesh data x fsdp)")


def train(cfg: Config, workdir: str) -> dict:
  """Trains to `cfg.train.steps`, resuming from the latest checkpoint in `workdir`."""
  mesh = sharding.make_mesh(cfg.mesh)
  check_batch(cfg, mesh)
  built = state_lib.build(cfg, mesh)
  spec, total = row_spec(cfg), cfg.train.steps
  stats = skips.SkipStats()
  data = pipeline.train_iterator(cfg.data, spec, global_batch=cfg.train.batch_size,
                                 seed=cfg.train.seed, stats=stats)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  start = ckpt.latest_step() or 0
  with jax.set_mesh(mesh):
    if start:
      metrics_lib.log(f"resuming from step {start} in {workdir}")
      state = state_lib.restore(built, cfg, ckpt, start, data)
    else:
      state = state_lib.initialise(built, cfg)
    # A LoRA run's checkpoints hold the fingerprint of its frozen base, not the base.
    base = ({"fingerprint": base_lib.fingerprint(state.frozen), "source": base_lib.source(cfg)}
            if base_lib.saves_base(cfg) else None)
  # Only now: a refused resume (another base, a bad checkpoint) leaves the run's record.
  write_config(cfg, workdir)
  batch_sh = batch_shardings(mesh, spec, cfg.train.batch_size)
  step_fn = jax.jit(functools.partial(train_step, built.fns),
                    in_shardings=(built.shardings, batch_sh),
                    out_shardings=(built.shardings, None), donate_argnums=0)
  counts = state_lib.param_counts(built.abstract)
  flops = metrics_lib.flops_per_step(cfg.model, cfg.train.batch_size, spec.seq_len,
                                     cfg.train.batch_size * spec.images_per_sample, counts,
                                     state_lib.trainable_modules(built.abstract))
  peak = metrics_lib.peak_flops_per_device()
  writer = metrics_lib.MetricsWriter(workdir)
  speed = metrics_lib.Throughput(start, total)
  last: dict = {}
  try:
    with jax.set_mesh(mesh):
      for step in range(start, total):
        local = next(data)
        real = int((local["segment_ids"] > 0).sum())
        speed.add(real * jax.process_count())
        state, m = step_fn(state, pipeline.global_batch(local, batch_sh))
        n = step + 1
        if n % cfg.train.log_every == 0 or n == total:
          last = {**jax.device_get(m), **speed.report(n), **stats.metrics(),
                  "data/packing_efficiency": real / local["segment_ids"].size}
          last["mfu"] = (flops / last["step_time_s"] / (peak * jax.device_count())
                         if peak else None)
          writer.write(n, last)
          metrics_lib.log(metrics_lib.progress_line(n, total, last))
        if (cfg.train.eval_every and n % cfg.train.eval_every == 0 and n < total
            and has_eval_data(cfg)):
          writer.write(n, evaluate_state(cfg, built, state, mesh))
        # Preemption is checked every step so the grace period is not wasted.
        preempted = n < total and ckpt.reached_preemption(n)
        if n < total and (n % cfg.checkpoint.every == 0 or preempted):
          ckpt.save(n, state, data, force=preempted, base=base)
        if preempted:
          ckpt.wait()
          metrics_lib.log(f"preempted: saved step {n}, exiting")
          return last
      if ckpt.latest_step() != total:
        ckpt.save(total, state, data, force=True, base=base)
      if not has_eval_data(cfg):
        metrics_lib.log("no held-out data (config.data.eval_json): final eval skipped")
        return last
      result = evaluate_state(cfg, built, state, mesh)
      writer.write(total, result)
      metrics_lib.log(f"final eval at step {total}: {_fmt(result)}")
      return {**last, **result}
  finally:
    ckpt.close()  # waits for any async save: a crash never loses a checkpoint in flight
    writer.close()


@functools.cache
def _eval_fn(built, batch_sh_items):
  """The jitted eval step, built once per (state layout, batch layout). It takes the state
  without its optimizer state (`_weights`), which --mode=eval never reads."""
  return jax.jit(functools.partial(eval_step, built.fns),
                 in_shardings=(_weights(built.shardings), dict(batch_sh_items)))


def _weights(state):
  return state.replace(opt_state=None)


def has_eval_data(cfg: Config) -> bool:
  return cfg.data.embedded or bool(cfg.data.eval_json)


def evaluate_state(cfg: Config, built, state, mesh) -> dict:
  """Loss, perplexity and exact-match answer accuracy on the held-out split."""
  spec = row_spec(cfg)
  batch_sh = batch_shardings(mesh, spec, cfg.train.batch_size)
  fn = _eval_fn(built, tuple(sorted(batch_sh.items())))
  data = pipeline.eval_iterator(cfg.data, spec, global_batch=cfg.train.batch_size)
  sums: dict[str, float] = {}
  names = pipeline.kind_names(cfg.data)
  per_kind = np.zeros((len(names), 2), np.int64)  # [kind, (exact, answers)]
  for i, local in enumerate(data):
    if cfg.train.eval_batches and i >= cfg.train.eval_batches:
      break
    kinds = local.pop("kind")[:, 0]
    out = fn(_weights(state), pipeline.global_batch(drop_modality(cfg, local), batch_sh))
    rows = {k: multihost_utils.process_allgather(out.pop(k), tiled=True)
            for k in ("row_exact", "row_answer")}
    out = jax.device_get(out)
    sums = {k: sums.get(k, 0) + float(v) for k, v in out.items()}
    kinds = multihost_utils.process_allgather(kinds, tiled=True)
    for k in range(len(names)):
      per_kind[k] += [(rows["row_exact"] & (kinds == k)).sum(),
                      (rows["row_answer"] & (kinds == k)).sum()]
  if not sums:
    raise ValueError(f"config.data.num_eval={cfg.data.num_eval}: fewer held-out samples than "
                     f"one batch of config.train.batch_size={cfg.train.batch_size}")
  loss = sums["loss_sum"] / max(sums["loss_tokens"], 1)
  result = {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0))),
            "eval/accuracy": sums["exact"] / max(sums["answers"], 1),
            "eval/samples": int(sums["answers"])}
  result.update(_accuracy_by_kind(names, per_kind))
  if cfg.eval.generate:
    result.update(generated_accuracy(cfg, built, state, spec))
  return result


def _accuracy_by_kind(names: tuple[str, ...], counts: np.ndarray) -> dict[str, float]:
  """eval/accuracy/<kind> for each kind, then eval/accuracy/<kind>/<question> where a kind's
  labels name questions: counts int[labels, (exact, answers)]."""
  kinds: dict[str, np.ndarray] = {}
  for name, c in zip(names, counts, strict=True):
    kinds[name.split("/")[0]] = kinds.get(name.split("/")[0], 0) + c
  out = {f"eval/accuracy/{k}": float(hits / n) for k, (hits, n) in kinds.items() if n}
  out.update({f"eval/accuracy/{name}": float(hits / n)
              for name, (hits, n) in zip(names, counts, strict=True) if n and "/" in name})
  return out


def drop_modality(cfg: Config, local: dict) -> dict:
  """The batch with `config.eval.drop_modality`'s input zeroed (an ablation): placeholders
  and validity stay, so the model sees the same sequence with that input blank."""
  key = {"image": "images", "video": "video", "audio": "audio"}.get(cfg.eval.drop_modality)
  if key is None or key not in local:
    return local
  return {**local, key: np.zeros_like(local[key])}


def generated_accuracy(cfg: Config, built, state, spec) -> dict:
  """VQA-style accuracy of greedy answers generated with the KV cache (mm_jax.infer)."""
  from flax import nnx

  from mm_jax.infer import generate, prompts, vqa

  if jax.process_count() > 1:  # Generator takes process-local numpy batches
    metrics_lib.log("eval.generate: single-process only for now; skipped")
    return {}
  tok = prompts.tokenizer_for(cfg)
  settings = generate.Decoding(max_new_tokens=cfg.generate.max_new_tokens,
                               stop_ids=prompts.stop_ids(cfg, tok), pad_id=int(tok.pad_id))
  gen = generate.Generator(nnx.merge(built.fns.graphdef, state.params, state.frozen), settings)
  data = pipeline.eval_iterator(cfg.data, spec, global_batch=cfg.train.batch_size)
  correct = total = 0
  for i, local in enumerate(data):
    if cfg.train.eval_batches and i >= cfg.train.eval_batches:
      break
    c, n = vqa.score_batch(gen, drop_modality(cfg, local), tok.decode)
    correct, total = correct + c, total + n
  return {"eval/vqa_accuracy": correct / max(total, 1)}


def evaluate(cfg: Config, workdir: str) -> dict:
  """--mode=eval: restores the latest checkpoint and evaluates it."""
  mesh = sharding.make_mesh(cfg.mesh)
  built = state_lib.build(cfg, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"--mode=eval: no checkpoint under {workdir}/checkpoints")
  try:
    with jax.set_mesh(mesh):
      state = state_lib.restore(built, cfg, ckpt, step, optimizer=False)
      result = evaluate_state(cfg, built, state, mesh)
  finally:
    ckpt.close()
  if jax.process_index() == 0:
    accuracy = {k.removeprefix("eval/accuracy/"): v for k, v in result.items()
                if k.startswith("eval/accuracy/")}
    by_question = {k: accuracy.pop(k) for k in list(accuracy) if "/" in k}
    # An ablation writes beside the plain result, never over it.
    drop = f"_drop_{cfg.eval.drop_modality}" if cfg.eval.drop_modality else ""
    with open(os.path.join(workdir, f"eval_{step}{drop}.json"), "w") as f:
      json.dump({"step": step, "accuracy": accuracy, "accuracy_by_question": by_question,
                 "drop_modality": cfg.eval.drop_modality, **result}, f, indent=2)
    writer = metrics_lib.MetricsWriter(workdir)
    writer.write(step, result)
    writer.close()
  metrics_lib.log(f"eval at step {step}: {_fmt(result)}")
  return result


def _fmt(d: dict) -> str:
  return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())
