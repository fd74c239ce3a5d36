"""Pure train and eval steps over split NNX state.

`train_step(state, batch, stop) -> (state, metrics)` has no Python side effects; `loop.py`
jits it once with explicit in/out shardings and donates `state`. A step whose loss or
gradient is not finite applies no update (parameters and optimizer state come back
unchanged, `skipped_nonfinite` = 1), and so does one whose update, new parameters or new
optimizer state are not: one bad batch or an overflow never poisons the state, and every
checkpoint stays finite. Gradient accumulation runs
micro-batches in a `lax.scan` and applies ONE optimizer update, normalising by the loss
tokens of the whole batch so the result equals the unaccumulated step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from mm_jax.models import lora
from mm_jax.train import losses


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # trainable parameters
  frozen: nnx.State  # frozen parameters (no optimizer state)
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepFns:
  """What the steps close over: static structure, never arrays."""

  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  grad_accum: int = 1
  dropout_seed: int | None = None  # None: no dropout anywhere (LoRA dropout is 0)
  loss_chunk: int = 0  # config.train.loss_chunk


def token_losses(fns: StepFns, params, frozen, batch, dropout_key=None
                 ) -> tuple[jax.Array, jax.Array]:
  """Per-token cross entropy float32[B, T] and argmax prediction int32[B, T], the
  logits taken `fns.loss_chunk` positions at a time (losses.py). With `dropout_key` the
  LoRA adapters' dropout is on (training); without, it is off."""
  model = nnx.merge(fns.graphdef, params, frozen)
  if dropout_key is not None:
    lora.set_dropout_keys(model, dropout_key)
  project, head = model.decoder.head()
  return losses.cross_entropy(project, head, model.hidden(batch), batch["targets"],
                              fns.loss_chunk)


def _microbatches(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...], micro-batch a taking rows a, a+n, ... (shard-local)."""
  b = batch["tokens"].shape[0]
  def split(x):
    rows = x.reshape((b, -1) + x.shape[1:])  # media: [B*Mi, ...] -> [B, Mi, ...]
    rows = rows.reshape((b // n, n) + rows.shape[1:]).swapaxes(0, 1)
    return rows.reshape((n, -1) + x.shape[1:])
  return jax.tree.map(split, batch)


def train_step(fns: StepFns, state: TrainState, batch: dict, stop: jax.Array | None = None
               ) -> tuple[TrainState, dict]:
  """stop: bool[B], each process's stop-signal flag on its own rows (stopping.py); the
  metrics' `stop` is their any() over every process."""
  mask = batch["loss_mask"]
  n_loss = jnp.maximum(mask.sum(), 1).astype(jnp.float32)

  def micro_loss(params, micro, index):
    key = None
    if fns.dropout_seed is not None:  # a pure function of (seed, step, micro-batch)
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(fns.dropout_seed),
                                                  state.step), index)
    ce, pred = token_losses(fns, params, state.frozen, micro, key)
    m = micro["loss_mask"]
    correct = ((pred == micro["targets"]) & m).sum()
    # where, not multiply: targets under placeholders may lie outside the vocabulary (NaN ce)
    return jnp.where(m, ce, 0.0).sum() / n_loss, correct

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  if fns.grad_accum == 1:
    (loss, correct), grads = grad_fn(state.params, batch, 0)
  else:
    def body(carry, xs):
      micro, index = xs
      (loss_a, c), g = grad_fn(state.params, micro, index)
      acc_l, acc_c, acc_g = carry
      return (acc_l + loss_a, acc_c + c, jax.tree.map(jnp.add, acc_g, g)), None
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zeros)
    xs = (_microbatches(batch, fns.grad_accum), jnp.arange(fns.grad_accum))
    (loss, correct, grads), _ = jax.lax.scan(body, init, xs)

  updates, opt_state = fns.tx.update(grads, state.opt_state, state.params)
  grad_norm = optax.tree.norm(grads)
  new_params = optax.apply_updates(state.params, updates)
  # Finite loss and gradient are not enough: a huge lr makes a finite gradient's update
  # inf, and a finite update can still overflow a parameter. Each array's all(isfinite)
  # (not a norm, whose square sum would overflow on large but finite values).
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(updates)
            & _all_finite(new_params) & _all_finite(opt_state))
  keep_if_bad = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  params = keep_if_bad(new_params, state.params)
  opt_state = keep_if_bad(opt_state, state.opt_state)
  metrics = {"loss": loss, "accuracy": correct / n_loss, "grad_norm": grad_norm,
             "lr": fns.schedule(state.step), "loss_tokens": mask.sum(),
             "tokens": (batch["segment_ids"] > 0).sum(),
             "skipped_nonfinite": (~finite).astype(jnp.int32)}
  if stop is not None:
    metrics["stop"] = stop.any()
  # The step counter advances either way: the data position and the schedule stay in step.
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _all_finite(tree) -> jax.Array:
  """bool[]: every floating value in `tree` is finite (integer leaves, e.g. counts, are)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def eval_step(fns: StepFns, state: TrainState, batch: dict) -> dict:
  """Sums for loss / perplexity and exact-match answer accuracy.

  A row's answer is exactly right when the argmax at every loss position equals the
  target; with teacher forcing this is the same event as greedy decoding reproducing
  the answer and its <eos>, so no sampling loop is needed here.
  """
  ce, pred = token_losses(fns, state.params, state.frozen, batch)
  m = batch["loss_mask"]
  hit = (pred == batch["targets"]) | ~m
  has_answer = m.any(-1)
  exact = hit.all(-1) & has_answer
  return {"loss_sum": jnp.where(m, ce, 0.0).sum(), "loss_tokens": m.sum(),
          "exact": exact.sum(), "answers": has_answer.sum(),
          "row_exact": exact, "row_answer": has_answer}  # bool[B]: per-kind accuracy
