"""How a run ends: the exit codes main.py returns and the exceptions that carry them.

A scheduler needs one fact from an exit code: restart me, or not. So:

  0   finished: train.steps done, the final checkpoint committed. Do not restart.
  1   an error a restart will not fix: bad config, data, workdir or checkpoints, a failed
      save (disk full), a failed distributed start. Fix it first.
  3   diverged: train.max_nonfinite_steps non-finite steps in a row; the checkpoints that
      may hold the state that started them are set aside, the message names the resume
      point. Do not restart unchanged.
  42  preempted (SIGTERM or SIGINT): every process saved the same step and the save
      committed, or the signal came before training started and nothing was lost.
      Restart: the same command resumes.
  43  lost: a peer process died, or the run made no progress for train.stall_timeout_s
      (a stuck collective, writer or input pipeline). Nothing was saved by this attempt;
      restart: the same command resumes from the newest intact checkpoint.

Each message is one line; main.py prints it and exits with the code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 42
EXIT_LOST = 43


class Preempted(Exception):  # noqa: N818 (an outcome, not an error)
  """A stop signal arrived; checkpoint `step` is committed. Exit 42 and restart."""

  exit_code = EXIT_PREEMPTED

  def __init__(self, step: int | None, signal_name: str, *, saved: bool = True,
               why_not: str = "during a non-finite streak", abandoned: bool = False):
    # saved=False: nothing written (during a non-finite streak, or no time left before the
    # kill: `why_not`); `step` is the newest checkpoint, where the restart resumes (None: it
    # starts over).
    done = (f"saved step {step}" if saved else
            f"nothing saved {why_not}; resumes from "
            f"{'step ' + str(step) if step else 'the start'}")
    self.saved = saved
    self.abandoned = abandoned  # a save given up at the grace period's end is in flight
    super().__init__(f"preempted by {signal_name}: {done}; exit {EXIT_PREEMPTED} (run the "
                     "same command to resume)")
    self.step, self.signal_name = step or 0, signal_name


class Diverged(RuntimeError):
  """Too many non-finite steps in a row, `streak_start` to `step`. None of them updated the
  state, but the state they started from may already be bad (a finite but huge update)."""

  exit_code = EXIT_DIVERGED

  def __init__(self, message: str, *, step: int = 0, streak_start: int = 0):
    super().__init__(message)
    self.step, self.streak_start = step, streak_start


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or none could be read. One line, names the step."""

  exit_code = EXIT_ERROR


class WriteError(OSError):
  """A file of the run could not be written (disk full, quota, permissions, a store that
  refuses). One line naming the file; the training loop adds the newest intact checkpoint.
  An OSError, so code that handles a failed write as one still does."""

  exit_code = EXIT_ERROR

  @classmethod
  def of(cls, path: str, e: BaseException) -> WriteError:
    why = getattr(e, "strerror", None) or one_line(e)
    return cls(f"cannot write {path}: {why}")


class PeerLost(RuntimeError):
  """Another process of the job died (a collective or the coordination service failed)."""

  exit_code = EXIT_LOST


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
