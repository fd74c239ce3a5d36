"""How a run ends: the exit codes main.py returns and the exceptions that carry them.

A scheduler needs one fact from an exit code: restart me, or not. So:

  0   finished: train.steps done, the final checkpoint committed. Do not restart.
  1   an error a restart will not fix: bad config, data, workdir or checkpoints, a failed
      save (disk full), a failed distributed start. Fix it first.
  3   diverged: train.max_nonfinite_steps non-finite steps in a row; every checkpoint on
      disk is finite. Do not restart unchanged.
  42  preempted (SIGTERM or SIGINT): every process saved the same step and the save
      committed. Restart: the same command resumes.

Each message is one line; main.py prints it and exits with the code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 42


class Preempted(Exception):  # noqa: N818 (an outcome, not an error)
  """A stop signal arrived; checkpoint `step` is committed. Exit 42 and restart."""

  exit_code = EXIT_PREEMPTED

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"preempted by {signal_name}: saved step {step}; "
                     f"exit {EXIT_PREEMPTED} (run the same command to resume)")
    self.step, self.signal_name = step, signal_name


class Diverged(RuntimeError):
  """Too many non-finite steps in a row. The state was never updated by one of them."""

  exit_code = EXIT_DIVERGED


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or none could be read. One line, names the step."""

  exit_code = EXIT_ERROR


class UnusableCheckpoint(CheckpointError):
  """Checkpoint `step` fails verification (corrupt, truncated, incomplete): fall back."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"checkpoint step {step}: {reason}")
    self.step, self.reason = step, reason


def one_line(e: BaseException, limit: int = 300) -> str:
  """The first non-empty line of an exception's message (libraries' messages run to
  pages), with its type when the message is empty."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  text = lines[0] if lines else type(e).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."
