"""Rematerialisation of transformer blocks: `model.remat = none | full | dots`.

none: every block's activations stay live for the backward pass (fastest, most memory).
full: `jax.checkpoint` with nothing saveable, so only each block's input is kept and the
  block reruns in the backward pass (about one extra forward).
dots: `checkpoint_dots_with_no_batch_dims` keeps the outputs of the weight matmuls (q/k/v/o,
  MLP projections: no dot_general batch dimension) and recomputes the rest: the elementwise
  ops, norms and the attention scores and weights. Those carry batch dims [B, N] and are
  O(T^2) per head, the largest and cheapest-to-recompute tensors, which is why this policy
  rather than `dots_saveable` (which would keep them too); as maxtext's `minimal` policy.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

REMAT = ("none", "full", "dots")

POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
             "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


def wrap(call: Callable, remat: str) -> Callable:
  """`call(block, *args)` under the remat mode's checkpoint policy (unchanged for none)."""
  if remat == "none":
    return call
  if remat not in POLICIES:
    raise ValueError(f"remat must be one of {REMAT}, got {remat!r}")
  policy = POLICIES[remat]

  # Plain jax.checkpoint over the block's split state, not nnx.remat: nnx.remat merges the
  # block back inside the checkpoint trace, which flax 0.12.8 refuses for Variables made
  # at an outer trace level (frozen parameters come from outside jax.grad:
  # "TraceContextError: Cannot mutate Param from a different trace level"). The block
  # does not mutate its state, so nothing has to flow back out.
  def run(block, *args):
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda s, *a: call(nnx.merge(graphdef, s), *a), policy=policy)(
        state, *args)
  return run
