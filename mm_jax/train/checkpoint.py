"""Orbax checkpoints of (train state, data iterator position), async and atomic.

Orbax writes each step to a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint intact; `wait()` is called before the process
exits on every path (see loop.py).
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from mm_jax.config import CheckpointConfig


class Checkpointer:
  def __init__(self, directory: str, cfg: CheckpointConfig):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.every, max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save, create=True)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "base": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, *, force: bool = False,
           base: dict | None = None) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved. With
    `base` (a LoRA run: mm_jax.train.base) the frozen parameters are left out and `base`,
    their fingerprint and source, is written instead."""
    items = {"state": ocp.args.StandardSave(state if base is None else state.replace(frozen=None)),
             "data": grain.checkpoint.CheckpointSave(data_iterator)}
    if base is not None:
      items["base"] = ocp.args.JsonSave(base)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, target, data_iterator=None, *, with_base: bool = False,
              partial: bool = False):
    """Restores the state into `target`'s shapes and shardings (any mesh), and the
    iterator position in place. `target`: pytree of jax.ShapeDtypeStruct with shardings.
    with_base: returns (state, the base record save() wrote). partial: `target` is a dict
    of some of the state's top-level fields; only those are read."""
    if partial:  # orbax's partial restore: only these fields' arrays are read
      if data_iterator is not None:
        raise ValueError("a partial restore is for eval and generate: no data position")
      state = ocp.PyTreeCheckpointer().restore(
          os.path.join(self.directory, str(step), "state"),
          args=ocp.args.PyTreeRestore(
              target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))
      if not with_base:
        return state
      base = self.manager.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore()))
      return state, base["base"]
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    if with_base:
      items["base"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return (restored["state"], restored["base"]) if with_base else restored["state"]

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_target(abstract, shardings):
  """ShapeDtypeStructs carrying the shardings the restored arrays must have."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
