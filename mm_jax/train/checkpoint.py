"""Orbax checkpoints of (train state, data iterator position), async, atomic and verified.

Orbax writes each step to a temporary directory and renames it when complete, so a crash
(or SIGKILL) mid-save leaves the previous checkpoint intact. On top of that:

- every checkpoint carries an `integrity` item: each array's digest and finiteness
  (mm_jax/train/integrity.py) plus the run's counters. A state with a non-finite array is
  never written (CheckpointError). restore() recomputes the digests of what it read and
  raises UnusableCheckpoint naming the step and the first array that differs.
- rotation is ours, not orbax's (`max_to_keep=None`): old checkpoints are deleted only
  after a newer one has committed with its digests, so no failed or half-written save
  ever costs a good checkpoint.
- poll() (every step) surfaces a failed async save at once (a full disk), as
  CheckpointError naming the step and the newest intact checkpoint.
"""

from __future__ import annotations

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mm_jax import paths
from mm_jax.config import CheckpointConfig
from mm_jax.faults import CheckpointError, UnusableCheckpoint, one_line
from mm_jax.train import data_position, integrity

QUARANTINE = "checkpoints_unusable"  # beside checkpoints/: steps that failed verification


class Checkpointer:
  def __init__(self, directory: str, cfg: CheckpointConfig, *, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, enable_async_checkpointing=cfg.async_save, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only)
    self.directory = paths.absolute(directory)
    self.keep = cfg.keep
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "base": ocp.JsonCheckpointHandler(),
                       "integrity": ocp.JsonCheckpointHandler()})
    self._pending: list[int] = []  # saved, commit not yet confirmed

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, *, base: dict | None = None,
           counters: dict | None = None) -> None:
    """Writes checkpoint `step` (async). With `base` (a LoRA run: mm_jax.train.base) the
    frozen parameters are left out and `base`, their fingerprint and source, is written
    instead. `counters`: small run totals restored with the state (read_counters)."""
    self.poll()  # a failed earlier save stops the run before another is started
    saved = state if base is None else state.replace(frozen=None)
    arrays = integrity.summarise(saved)
    bad = integrity.nonfinite(arrays)
    if bad:
      raise CheckpointError(
          f"refusing to write checkpoint step {step}: non-finite values in {bad[0]}"
          + (f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""))
    items = {"state": ocp.args.StandardSave(saved),
             "data": grain.checkpoint.CheckpointSave(data_iterator),
             "integrity": ocp.args.JsonSave({"arrays": arrays, "counters": counters or {}})}
    if base is not None:
      items["base"] = ocp.args.JsonSave(base)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # a synchronous failure (the directory went away, no space)
      raise self._save_failed(step, e) from None
    self._pending.append(step)
    self.poll()

  def poll(self) -> None:
    """Raises CheckpointError if an async save failed; once saves have committed, rotates
    out the checkpoints beyond the newest `keep`. Cheap: called every step."""
    if not self._pending:
      return
    try:
      self.manager.check_for_errors()
    except Exception as e:
      raise self._save_failed(self._pending[-1], e) from None
    if self.manager.is_saving_in_progress():
      return
    self._confirm()

  def _on_disk(self, step: int) -> bool:
    # Under its final name: orbax lists a step as soon as its save starts.
    return (epath.Path(self.directory) / str(step)).exists()

  def _confirm(self) -> None:
    lost = [s for s in self._pending if not self._on_disk(s)]
    if lost:
      try:  # the background thread's error, where orbax kept one
        self.manager.wait_until_finished()
        self.manager.check_for_errors()
        why: Exception = RuntimeError("the step never committed")
      except Exception as e:
        why = e
      raise self._save_failed(lost[0], why)
    self._pending.clear()
    steps = self.all_steps()
    for old in steps[:-self.keep]:
      self.manager.delete(old)

  def _save_failed(self, step: int, e: Exception) -> CheckpointError:
    # orbax may raise a failure while a later save is queued: the failed step is the
    # oldest one not committed; steps already under their final name are intact.
    lost = [s for s in self._pending if not self._on_disk(s)]
    step = lost[0] if lost else step
    intact = [s for s in self.all_steps() if s not in lost and s != step and self._on_disk(s)]
    newest = f"step {intact[-1]}" if intact else "none"
    return CheckpointError(f"checkpoint step {step} failed to save ({one_line(e)}); "
                           f"newest intact checkpoint: {newest} in {self.directory}")

  def restore(self, step: int, target, data_iterator=None, *, with_base: bool = False,
              partial: bool = False):
    """Restores the state into `target`'s shapes and shardings (any mesh), and the
    iterator position in place, then verifies every array read against the digests
    written with it (UnusableCheckpoint on a mismatch). `target`: pytree of
    jax.ShapeDtypeStruct with shardings. with_base: returns (state, the base record save()
    wrote). partial: `target` is a dict of some of the state's top-level fields; only
    those are read."""
    if not paths.isdir(paths.join(self._step_dir(step), "state")):
      raise UnusableCheckpoint(step, "incomplete: no state/ folder")
    if partial:  # orbax's partial restore: only these fields' arrays are read
      if data_iterator is not None:
        raise ValueError("a partial restore is for eval and generate: no data position")
      state = ocp.PyTreeCheckpointer().restore(
          paths.join(self._step_dir(step), "state"),
          args=ocp.args.PyTreeRestore(
              target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))
      base = self._read_json(step, "base") if with_base else None
    else:
      items = {"state": ocp.args.StandardRestore(target)}
      data_dir = paths.join(self._step_dir(step), "data")
      saved_n = data_position.saved_process_count(data_dir)
      reshard = data_iterator is not None and saved_n not in (None, jax.process_count())
      if data_iterator is not None and not reshard:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      if with_base:
        items["base"] = ocp.args.JsonRestore()
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      state, base = restored["state"], restored.get("base")
      if reshard:  # written by another number of processes: data_position.py
        data_iterator.set_state(data_position.resharded_state(
            data_dir, jax.process_count(), jax.process_index()))
    self.verify(step, state)
    return (state, base) if with_base else state

  def verify(self, step: int, state) -> None:
    """UnusableCheckpoint unless every array in `state` has the digest saved with it.
    Checkpoints written before digests existed have no integrity item: not verified."""
    record = self._read_json(step, "integrity")
    if record is None:
      return
    restored = integrity.summarise(state)
    bad = integrity.mismatches(record["arrays"], restored)
    if bad:
      got = restored[bad[0]]["digest"]
      want = record["arrays"].get(bad[0], {}).get("digest", "none")
      raise UnusableCheckpoint(step, f"array {bad[0]} does not match its digest (read {got}, "
                                     f"saved {want}; {len(bad)} arrays differ)")

  def read_counters(self, step: int) -> dict:
    record = self._read_json(step, "integrity")
    return dict(record["counters"]) if record else {}

  def _read_json(self, step: int, item: str) -> dict | None:
    if not paths.isdir(paths.join(self._step_dir(step), item)):
      return None
    return self.manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.JsonRestore()}))[item]

  def _step_dir(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def saved_shapes(self, step: int) -> dict[str, tuple]:
    """{array path: shape} of checkpoint `step`'s state, from its metadata (no array
    data read): what a resume compares with the model it builds."""
    meta = self.manager.item_metadata(step)["state"]
    flat = jax.tree_util.tree_flatten_with_path(
        meta, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {integrity.path_name(p): tuple(m.shape) for p, m in flat if hasattr(m, "shape")}

  def quarantine(self, step: int) -> str:
    """Moves checkpoint `step` out of the way (kept for inspection, never deleted) to
    <workdir>/checkpoints_unusable/<step>; process 0 moves, every process waits."""
    dest = paths.join(paths.parent(self.directory), QUARANTINE, str(step))
    if jax.process_index() == 0:
      paths.makedirs(paths.parent(dest))
      if paths.exists(dest):
        paths.rmtree(dest)
      paths.move(self._step_dir(step), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"mm_jax quarantine {step}")
    self.manager.reload()
    return dest

  def wait(self) -> None:
    """Blocks until every save has committed (CheckpointError if one failed)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(self._pending[-1] if self._pending else -1, e) from None
    self.poll()

  def close(self) -> None:
    """Waits for any save in flight (a crash never loses one that can still commit)."""
    try:
      self.manager.wait_until_finished()
    except Exception:  # noqa: S110  already reported by poll()/wait(), or about to be
      pass
    finally:
      self.manager.close()


def restore_target(abstract, shardings):
  """ShapeDtypeStructs carrying the shardings the restored arrays must have."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
