"""Held-out evaluation: loss, perplexity and exact-match accuracy (per question kind), the
optional generated-answer accuracy, --mode=eval on the newest checkpoint, and the
WORKDIR/eval_<step>.json a training run and --mode=eval both write."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from mm_jax import heartbeat, paths, sharding
from mm_jax.config import Config
from mm_jax.data import pipeline
from mm_jax.train import batches, recovery
from mm_jax.train import metrics as metrics_lib
from mm_jax.train import state as state_lib
from mm_jax.train.checkpoint import Checkpointer
from mm_jax.train.step import eval_step


def read_eval(workdir: str, step: int) -> dict:
  """The eval a finished run wrote for its last step ({} if there is none)."""
  path = paths.join(workdir, f"eval_{step}.json")
  if not paths.exists(path):
    return {}
  try:
    return json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return {}


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
  """Loss, perplexity and exact-match answer accuracy on the held-out split, every record
  scored once (padding rows count toward nothing: pipeline.eval_iterator)."""
  spec = batches.row_spec(cfg)
  batch_sh = batches.batch_shardings(mesh, spec, cfg.train.batch_size)
  fn = _eval_fn(built, tuple(sorted(batch_sh.items())))
  data = pipeline.eval_iterator(cfg.data, spec, global_batch=cfg.train.batch_size,
                                max_batches=cfg.train.eval_batches)
  sums: dict[str, float] = {}
  names = pipeline.kind_names(cfg.data)
  per_kind = np.zeros((len(names), 2), np.int64)  # [kind, (exact, answers)]
  for local in data:
    heartbeat.beat("eval")
    # A padding row has no loss token, so eval_step's sums skip it; per kind, its kind -1.
    kinds = np.where(local.pop("row_valid"), local.pop("kind")[:, 0], -1)
    out = fn(_weights(state), pipeline.global_batch(drop_modality(cfg, local), batch_sh))
    rows = {k: multihost_utils.process_allgather(out.pop(k), tiled=True)
            for k in ("row_exact", "row_answer")}
    out = jax.device_get(out)
    sums = {k: sums.get(k, 0) + float(v) for k, v in out.items()}
    kinds = multihost_utils.process_allgather(kinds, tiled=True)
    for k in range(len(names)):
      per_kind[k] += [(rows["row_exact"] & (kinds == k)).sum(),
                      (rows["row_answer"] & (kinds == k)).sum()]
  if not sums.get("answers"):
    raise ValueError(f"no held-out record to score (config.data.num_eval="
                     f"{cfg.data.num_eval}, or every record skipped)")
  loss = sums["loss_sum"] / max(sums["loss_tokens"], 1)
  result = {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0))),
            "eval/accuracy": sums["exact"] / max(sums["answers"], 1),
            "eval/samples": int(sums["answers"])}
  result.update(_accuracy_by_kind(names, per_kind))
  if cfg.eval.generate:
    result.update(generated_accuracy(cfg, built, state, spec, mesh))
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


def generated_accuracy(cfg: Config, built, state, spec, mesh) -> dict:
  """VQA-style accuracy of greedy answers generated with the KV cache (mm_jax.infer).

  With several processes each decode is one program over the mesh, on the sharded
  parameters: every process hands in its own rows (as many batches each: eval_iterator), scores
  the answers it gets back, and the counts are summed, so all return the same numbers.
  """
  from flax import nnx

  from mm_jax.infer import generate, prompts, vqa

  tok = prompts.tokenizer_for(cfg)
  settings = generate.Decoding(max_new_tokens=cfg.generate.max_new_tokens,
                               stop_ids=prompts.stop_ids(cfg, tok), pad_id=int(tok.pad_id))
  spmd = jax.process_count() > 1
  gen = generate.Generator(nnx.merge(built.fns.graphdef, state.params, state.frozen), settings,
                           mesh=mesh if spmd else None)
  score = vqa.score_every_row if spmd else vqa.score_batch
  data = pipeline.eval_iterator(cfg.data, spec, global_batch=cfg.train.batch_size,
                                max_batches=cfg.train.eval_batches)
  correct = total = 0
  for local in data:
    heartbeat.beat("eval generate")
    # Only rows with a loss token are scored: never a padding row.
    local["loss_mask"] = local["loss_mask"] & local.pop("row_valid")[:, None]
    c, n = score(gen, drop_modality(cfg, local), tok.decode)
    correct, total = correct + c, total + n
  if spmd:
    correct, total = (int(x) for x in multihost_utils.process_allgather(
        np.array([correct, total], np.int64)).sum(0))
  return {"eval/vqa_accuracy": correct / max(total, 1), "eval/vqa_samples": total}


def evaluate(cfg: Config, workdir: str) -> dict:
  """--mode=eval: restores the latest checkpoint and evaluates it."""
  mesh = sharding.make_mesh(cfg.mesh)
  built = state_lib.build(cfg, mesh)
  directory = paths.join(workdir, "checkpoints")
  if not paths.isdir(directory) or not paths.listdir(directory):
    raise FileNotFoundError(f"--mode=eval: no checkpoint under {workdir}/checkpoints")
  # read_only: a run training in this workdir may be writing a checkpoint right now.
  ckpt = Checkpointer(directory, cfg.checkpoint, read_only=True)
  try:
    with jax.set_mesh(mesh):  # the newest checkpoint that verifies; nothing is moved
      state, step = recovery.restore_latest(built, cfg, ckpt, workdir, optimizer=False,
                                            move_aside=False)
      if state is None:
        raise FileNotFoundError(f"--mode=eval: no checkpoint under {directory}")
      result = evaluate_state(cfg, built, state, mesh)
  finally:
    ckpt.close()
  write_eval_json(cfg, workdir, step, result)
  if jax.process_index() == 0:
    writer = metrics_lib.MetricsWriter(workdir)
    writer.write(step, result)
    writer.close()
  metrics_lib.log(f"eval at step {step}: {fmt(result)}")
  return result


def write_eval_json(cfg: Config, workdir: str, step: int, result: dict) -> None:
  """WORKDIR/eval_<step>.json (process 0): accuracy per kind and per question, then every
  metric of `result` (evaluate_state), for --mode=eval and the evals of a training run."""
  if jax.process_index() != 0:
    return
  accuracy = {k.removeprefix("eval/accuracy/"): v for k, v in result.items()
              if k.startswith("eval/accuracy/")}
  by_question = {k: accuracy.pop(k) for k in list(accuracy) if "/" in k}
  # An ablation writes beside the plain result, never over it.
  drop = f"_drop_{cfg.eval.drop_modality}" if cfg.eval.drop_modality else ""
  paths.write_text(paths.join(workdir, f"eval_{step}{drop}.json"), json.dumps(
      {"step": step, "accuracy": accuracy, "accuracy_by_question": by_question,
       "drop_modality": cfg.eval.drop_modality, **result}, indent=2))


def fmt(d: dict) -> str:
  """`key value` pairs, floats to 4 places: Python floats, numpy scalars and the 0-d arrays
  device_get gives for the train metrics."""
  def one(v):
    if isinstance(v, np.ndarray) and v.ndim == 0:
      v = v.item()
    return f"{v:.4f}" if isinstance(v, float | np.floating) else f"{v}"

  return " ".join(f"{k} {one(v)}" for k, v in d.items())
