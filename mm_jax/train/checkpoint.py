"""Orbax checkpoints of (train state, data iterator position), async, atomic and verified.

Orbax writes each step to a temporary directory and renames it when complete, so a crash
(or SIGKILL) mid-save leaves the previous checkpoint intact. On top of that:

- every checkpoint carries an `integrity` item: each array's digest and finiteness
  (mm_jax/train/integrity.py), a digest of each process's data position, the run's
  counters and config, and a digest of the whole record. A state with a non-finite array
  is never written (CheckpointError). restore() checks the record, the data position
  files and every array read against it, and raises UnusableCheckpoint naming the step
  and the first part that differs. A checkpoint without a record is refused by name
  unless config.checkpoint.allow_unverified.
- rotation is ours, not orbax's (`max_to_keep=None`): old checkpoints are deleted only
  after a newer one has committed and been vouched for (the step after it applied its
  update: `vouch`), so no failed save, and no save of a state that turns out to start a
  non-finite streak, ever costs the good checkpoints before it.
- poll() (every step) surfaces a failed async save at once (a full disk), as
  CheckpointError naming the step and the newest intact checkpoint.
"""

from __future__ import annotations

import json
import logging
import time

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mm_jax import paths
from mm_jax.config import CheckpointConfig
from mm_jax.faults import CheckpointError, UnusableCheckpoint, one_line
from mm_jax.train import data_position, integrity
from mm_jax.train import metrics as metrics_lib

QUARANTINE = "checkpoints_unusable"  # beside checkpoints/: steps that failed verification


class _ReadOnlyNotice(logging.Filter):
  """orbax warns "Given directory is read only=<dir>" whenever read_only=True, i.e. on every
  --mode=eval, --mode=generate and export: the option we chose, not a problem to report."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


class Checkpointer:
  def __init__(self, directory: str, cfg: CheckpointConfig, *, read_only: bool = False):
    # read_only: no saves, so save_interval_steps=0 (orbax warns and sets it otherwise).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, enable_async_checkpointing=cfg.async_save, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only,
        save_interval_steps=0 if read_only else 1)
    self.directory = paths.absolute(directory)
    self.keep, self.allow_unverified = cfg.keep, cfg.allow_unverified
    quiet, absl_logger = _ReadOnlyNotice(), logging.getLogger("absl")  # orbax logs with absl
    absl_logger.addFilter(quiet)
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "data": grain.checkpoint.CheckpointHandler(),
                         "base": ocp.JsonCheckpointHandler(),
                         "integrity": ocp.JsonCheckpointHandler()})
    finally:
      absl_logger.removeFilter(quiet)
    self._pending: list[int] = []  # saved, commit not yet confirmed
    self._closed = False
    self._abandoned = False  # wait(timeout_s) gave up on a save in flight
    self.vouched = -1  # checkpoints up to this step were followed by a step that applied
    self.newest_intact: int | None = self.latest_step()  # committed, under its final name

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, *, base: dict | None = None,
           counters: dict | None = None, config: dict | None = None) -> None:
    """Writes checkpoint `step` (async). With `base` (a LoRA run: mm_jax.train.base) the
    frozen parameters are left out and `base`, their fingerprint and source, is written
    instead. `counters`: small run totals restored with the state (read_counters);
    `config`: the run's config (read_config). Both are covered by the record's digest."""
    self.poll()  # a failed earlier save stops the run before another is started
    saved = state if base is None else state.replace(frozen=None)
    arrays = integrity.summarise(saved)
    bad = integrity.nonfinite(arrays)
    if bad:
      raise CheckpointError(
          f"refusing to write checkpoint step {step}: non-finite values in {bad[0]}"
          + (f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""))
    record = integrity.record(arrays, data=integrity.data_digests(data_iterator.get_state()),
                              counters=counters or {}, config=config, base=base)
    items = {"state": ocp.args.StandardSave(saved),
             "data": grain.checkpoint.CheckpointSave(data_iterator),
             "integrity": ocp.args.JsonSave(record)}
    if base is not None:
      items["base"] = ocp.args.JsonSave(base)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # a synchronous failure (the directory went away, no space)
      raise self._save_failed(step, e) from None
    self._pending.append(step)
    self.poll()

  def vouch(self, step: int) -> None:
    """Checkpoints up to `step` were followed by a step that applied its update (their state
    is not the start of a non-finite streak): they may now rotate out older ones."""
    self.vouched = max(self.vouched, step)
    if not self._pending:
      self._rotate()

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
    self.newest_intact = max([*self._pending, self.newest_intact or 0])
    self._pending.clear()
    self._rotate()

  def _rotate(self) -> None:
    # The newest `keep` vouched checkpoints stay, and every newer one not yet vouched.
    vouched = [s for s in self.all_steps() if s <= self.vouched]
    for old in vouched[:-self.keep]:
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
    record = self.read_record(step)  # before any array is read: a bad record ends it here
    if data_iterator is not None and record is not None:
      self._verify_data(step, record)
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
    self.verify(step, state, record)
    if base is not None and record is not None and (
        integrity.json_digest(base) != record.get("base")):
      raise UnusableCheckpoint(step, "base/ (the LoRA base's fingerprint) does not match its "
                                     "digest")
    return (state, base) if with_base else state

  def read_record(self, step: int) -> dict | None:
    """Checkpoint `step`'s integrity record, checked against its own digest; None for a
    checkpoint without one when config.checkpoint.allow_unverified (else refused)."""
    try:
      record = self._read_json(step, "integrity")
    except Exception as e:
      raise UnusableCheckpoint(step, f"integrity record unreadable ({one_line(e)})") from None
    if record is None:
      if not self.allow_unverified:
        raise UnusableCheckpoint(step, "no integrity record (integrity/ is missing), so it "
                                       "cannot be verified; a checkpoint written before "
                                       "digests existed resumes with "
                                       "--config.checkpoint.allow_unverified=True")
      metrics_lib.log(f"checkpoint step {step}: no integrity record; used unverified "
                      "(config.checkpoint.allow_unverified)")
      return None
    problem = integrity.check_record(record)
    if problem and not (self.allow_unverified and "older mm_jax" in problem):
      raise UnusableCheckpoint(step, problem)
    return record

  def _verify_data(self, step: int, record: dict) -> None:
    """Each process's data-position file against the digest saved with it."""
    want = record.get("data")
    if want is None:  # an older record, accepted with allow_unverified
      return
    data_dir = paths.join(self._step_dir(step), "data")
    n = len(want)
    for i, digest in enumerate(want):
      name = f"process_{i}-of-{n}.json"
      try:
        got = integrity.json_digest(json.loads(paths.read_text(paths.join(data_dir, name))))
      except (OSError, ValueError) as e:
        raise UnusableCheckpoint(step, f"data position {name} unreadable "
                                       f"({one_line(e)})") from None
      if got != digest:
        raise UnusableCheckpoint(step, f"data position {name} does not match its digest "
                                       f"(read {got}, saved {digest})")

  def verify(self, step: int, state, record: dict | None = None) -> None:
    """UnusableCheckpoint unless every array in `state` has the digest saved with it and
    is finite. `record`: the checked record (read_record) where the caller has it."""
    record = record if record is not None else self.read_record(step)
    if record is None:
      return
    restored = integrity.summarise(state)
    bad = integrity.mismatches(record["arrays"], restored)
    if bad:
      got = restored[bad[0]]["digest"]
      want = record["arrays"].get(bad[0], {}).get("digest", "none")
      raise UnusableCheckpoint(step, f"array {bad[0]} does not match its digest (read {got}, "
                                     f"saved {want}; {len(bad)} arrays differ)")
    poisoned = integrity.nonfinite(restored)
    if poisoned:  # never written so; a checkpoint from elsewhere is not resumed into
      raise UnusableCheckpoint(step, f"array {poisoned[0]} holds non-finite values")

  def read_counters(self, step: int) -> dict:
    record = self.read_record(step)
    return dict(record.get("counters", {})) if record else {}

  def read_config(self, step: int) -> dict | None:
    """The config checkpoint `step` was written with (None for records without one)."""
    record = self.read_record(step)
    return record.get("config") if record else None

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
    self.newest_intact = self.latest_step()
    return dest

  def wait(self, timeout_s: float | None = None) -> bool:
    """Blocks until every save has committed (CheckpointError if one failed); True. With
    `timeout_s`, gives up after that long instead: False, and the save in flight is
    abandoned: close() no longer waits for it, and a restart never resumes from it (orbax
    lists a step only once its commit is complete)."""
    if timeout_s is not None:
      end = time.monotonic() + timeout_s
      while self.manager.is_saving_in_progress():
        if time.monotonic() >= end:
          self._abandoned = True
          return False
        time.sleep(0.05)
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(self._pending[-1] if self._pending else -1, e) from None
    self.poll()
    return True

  def close(self) -> None:
    """Waits for any save in flight (a crash never loses one that can still commit).
    Idempotent."""
    if self._closed:
      return
    self._closed = True
    if self._abandoned:  # the process exits before the kill; the save dies with it
      return
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
