"""Resume from the newest checkpoint that verifies; refuse one that does not fit the model.

For each step, newest first:
1. its metadata's array shapes are compared with the model the config builds. A mismatch
   is the user's change, not corruption: ConfigError naming the parameter, both shapes and
   the config keys that differ from the workdir's config.json. Nothing is moved.
2. it is restored and every array checked against its digest (checkpoint.py). A corrupt,
   truncated, deleted or missing file, or a step folder with only its metadata, is
   reported in one line naming the step and the array, moved to
   `checkpoints_unusable/<step>` (never deleted), and the next older step is tried.
All processes take the same decision (one allgather per step tried).
"""

from __future__ import annotations

import contextlib
import gc
import re
import sys

import jax
import numpy as np

from mm_jax import paths
from mm_jax.config import Config, ConfigError
from mm_jax.faults import CheckpointError, UnusableCheckpoint, one_line
from mm_jax.train import integrity
from mm_jax.train import metrics as metrics_lib
from mm_jax.train import state as state_lib
from mm_jax.train import workdir as workdir_lib
from mm_jax.train.checkpoint import QUARANTINE, Checkpointer


def expected_shapes(built: state_lib.Built, cfg: Config, optimizer: bool) -> dict[str, tuple]:
  """{array path: shape} that a checkpoint of this config holds (what restore reads)."""
  from mm_jax.train import base

  abstract = built.abstract
  if base.saves_base(cfg):
    abstract = abstract.replace(frozen=None)
  if not optimizer:
    abstract = abstract.replace(opt_state=None)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {integrity.path_name(p): tuple(x.shape) for p, x in flat}


def check_fits(step: int, saved: dict[str, tuple], want: dict[str, tuple], where: str,
               diff: str, optimizer: bool) -> None:
  """ConfigError if checkpoint arrays `saved` do not have the shapes the model wants."""
  bad = [(k, saved[k], v) for k, v in want.items() if k in saved and saved[k] != v]
  missing = [k for k in want if k not in saved]
  extra = [k for k in saved if k not in want and (optimizer or not k.startswith("opt_state"))]
  if not (bad or missing or extra):
    return
  if bad:
    k, old, new = bad[0]
    what = f"{k} is {old} in the checkpoint, {new} now"
  elif missing:
    what = f"{missing[0]} is not in the checkpoint"
  else:
    what = f"the checkpoint has {extra[0]}, which the model does not"
  n = len(bad) + len(missing) + len(extra)
  more = f" ({n} arrays differ)" if n > 1 else ""
  cause = diff or "no difference from config.json (did the code change?)"
  raise ConfigError(f"resume from step {step} in {where}: the checkpoint does not fit the "
                    f"model: {what}{more}; {cause}. Use the saved values or a new --workdir")


def _read_error(e: Exception) -> str:
  """One line for an orbax/tensorstore read failure, naming the array when the message
  has its key (tensorstore prints the array's path inside the checkpoint)."""
  keys = [p for p in re.findall(r"'path': '([^']+)'", str(e)) if "/" not in p.rstrip("/")]
  cause = one_line(e.__cause__) if e.__cause__ else ""
  if keys:
    name = keys[0].rstrip("/").replace(".", "/")
    return f"array {name} could not be read (missing, truncated or corrupt data file{': ' + cause if cause else ''})"  # noqa: E501
  return f"could not be read ({one_line(e)})"


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """After a failed read, orbax leaves coroutines and tensorstore callbacks behind that
  print pages of 'Exception ignored in' when collected. The failure itself is reported in
  one line; collect them here, silently."""
  hook = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = hook


def _all_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _attempt(built, cfg, ckpt, step, data, optimizer, fits):
  """(state, "") or (None, why checkpoint `step` is unusable); ConfigError propagates."""
  try:
    try:
      saved = ckpt.saved_shapes(step)
    except Exception as e:
      raise UnusableCheckpoint(step, f"metadata unreadable ({one_line(e)})") from None
    fits(saved)
    return state_lib.restore(built, cfg, ckpt, step, data, optimizer=optimizer), ""
  except ConfigError:
    raise
  except UnusableCheckpoint as e:
    return None, e.reason
  except Exception as e:
    return None, _read_error(e)


def restore_latest(built: state_lib.Built, cfg: Config, ckpt: Checkpointer, workdir: str,
                   data=None, *, optimizer: bool = True, move_aside: bool = True):
  """(state, step) from the newest checkpoint that verifies, or (None, 0) when there is
  none yet. move_aside=False (eval, export): unusable steps are skipped, not moved."""
  steps = ckpt.all_steps()
  quarantined = paths.join(workdir, QUARANTINE)
  if not steps:
    if move_aside and paths.isdir(quarantined) and paths.listdir(quarantined):
      raise CheckpointError(
          f"{quarantined} holds checkpoints that failed verification and none is left in "
          f"{ckpt.directory}: remove {quarantined} to train from scratch")
    return None, 0
  want = expected_shapes(built, cfg, optimizer)
  diff = workdir_lib.format_diff(workdir_lib.config_diff(workdir_lib.saved_config(workdir),
                                                         cfg))
  for i, step in enumerate(reversed(steps)):
    with _quiet_abandoned_reads():
      state, reason = _attempt(built, cfg, ckpt, step, data, optimizer,
                               lambda saved, s=step: check_fits(s, saved, want, workdir, diff,
                                                                optimizer))
    if _all_agree(state is not None):
      return state, step
    reason = reason or "failed on another process"
    if move_aside:
      metrics_lib.log(f"checkpoint step {step} is unusable: {reason}; moved to "
                      f"{ckpt.quarantine(step)}")
    else:
      metrics_lib.log(f"checkpoint step {step} is unusable: {reason}; skipped")
    if i + 1 < len(steps):
      metrics_lib.log(f"falling back to checkpoint step {steps[-2 - i]}")
  raise CheckpointError(f"no checkpoint in {ckpt.directory} verifies (tried steps "
                        f"{', '.join(map(str, reversed(steps)))})")
