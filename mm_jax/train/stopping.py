"""When the loop stops early: a stop signal, or too many non-finite steps in a row.

Both are decided from flags the compiled step returns, read one step late (the host never
waits on the step it just launched):

- `stop`: each process feeds its signal flag as a bool per local batch row; the step
  returns their `any()`, an all-reduce over every process. All processes therefore read
  the same value after the same step and save the same step, with no extra collective
  and whether or not `jax.distributed` is up. (jax's own preemption sync point hears only
  SIGTERM, and only when distributed.)
- `skipped_nonfinite`: the step left the state unchanged because the loss, the gradient,
  the update or the new state was not finite (step.py); `max_nonfinite` of them in a row
  raise Diverged, which names the streak so that the loop can set aside the checkpoints
  that may hold the state that started it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import numpy as np

from mm_jax.faults import Diverged

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Context: SIGTERM and SIGINT set `received` (the signal's name) instead of killing
  the process. A second signal while the run stops is reported and ignored, so it cannot
  interrupt the save it is waiting for. Handlers are restored on exit."""

  def __init__(self):
    self.received: str | None = None
    self.at: float | None = None  # time.monotonic() of the first signal
    self._old: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals are main-only
      self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)
    self._old = {}

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.received:
      _say(f"{name} received again: ignored; the run is already stopping (it saves, then "
           "exits 42)")
      return
    self.received, self.at = name, time.monotonic()
    _say(f"{name} received: saving a checkpoint after this step, then exiting 42")

  def left(self, grace_s: float) -> float | None:
    """Seconds left until the kill that follows this process's signal `grace_s` after it;
    None without a limit (grace_s 0) or without a signal here (a stop another process
    heard: this one's scheduler has not started counting)."""
    if not grace_s or self.at is None:
      return None
    return grace_s - (time.monotonic() - self.at)

  def rows(self, n: int) -> np.ndarray:
    """bool[n]: this process's flag for each of its `n` local batch rows."""
    return np.full((n,), self.received is not None)


def _say(line: str) -> None:
  # os.write, not print: a handler may interrupt a print, and print is not reentrant.
  os.write(2, f"[process {jax.process_index()}] {line}\n".encode())


class StepGuard:
  """Reads the steps' `stop` and `skipped_nonfinite` flags in order; counts skipped steps.

  `observe(step, metrics)` for every step, in order (the loop reads each one step late, or
  at once before a save, so a checkpoint's counter includes its own step)."""

  def __init__(self, max_nonfinite: int, skipped_total: int = 0):
    self.max_nonfinite = max_nonfinite
    self.skipped_total = skipped_total  # over the whole run, restored from the checkpoint
    self.streak = 0
    self.streak_start = 0  # the first skipped step of the current streak
    self.last_finite = 0  # the newest step that applied its update
    self.observed = 0  # the newest step observed
    self.stop = False  # every process saw a stop signal's flag

  def observe(self, step: int, metrics: dict) -> None:
    """Raises Diverged(step, streak_start) at the max_nonfinite-th skipped step in a row."""
    flags = jax.device_get({k: metrics[k] for k in ("stop", "skipped_nonfinite")
                            if k in metrics})
    self.observed = step
    self.stop = self.stop or bool(flags.get("stop", False))
    if bool(flags["skipped_nonfinite"]):
      self.skipped_total += 1
      self.streak += 1
      self.streak_start = self.streak_start if self.streak > 1 else step
    else:
      self.streak, self.last_finite = 0, step
    if self.streak >= self.max_nonfinite:
      raise Diverged(
          f"diverged: {self.streak} non-finite steps in a row, steps {self.streak_start}-"
          f"{step} (config.train.max_nonfinite_steps={self.max_nonfinite}); none applied "
          "its update", step=step, streak_start=self.streak_start)
