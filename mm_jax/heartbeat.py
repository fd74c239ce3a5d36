"""The child's side of the supervisor (mm_jax/supervise.py): progress beats and stack dumps.

beat() is cheap enough for every training step: one os.write of a short JSON line to the pipe
the supervisor reads, e.g.

  beat("compile", stall_s=1800)            # before a phase that may take long
  beat("train", step=step, ckpt=restored, stall_s=cfg.train.stall_timeout_s)
  beat(step=step)                          # each step

Every line is progress; the supervisor's watchdog ends the run stall_s seconds after the last
one (stall_s > 0 turns it on, 0 off). It never raises and never blocks: a full pipe drops the
beat (the supervisor is behind, not the run), a gone supervisor turns beats off. Unsupervised,
every call is a no-op.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import stat

from mm_jax.supervise import ENV_BEAT_FD, ENV_SUPERVISED

_UNSET = object()  # ckpt not given (None is sent: "no checkpoint yet")
_fd: int | None = None  # the beat pipe once looked up; -1: none, or the supervisor is gone


def supervised() -> bool:
  return bool(os.environ.get(ENV_SUPERVISED))


def _pipe() -> int:
  global _fd
  if _fd is None:
    _fd = -1
    try:
      fd = int(os.environ[ENV_BEAT_FD])
      # The variable is inherited by whatever the run starts, where the number may name
      # another file: write only to a pipe.
      if stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)  # a program the run executes has no beats to give
        _fd = fd
    except (KeyError, ValueError, OSError):
      pass
  return _fd


def beat(phase: str | None = None, *, step: int | None = None, ckpt: int | None = _UNSET,
         stall_s: float | None = None) -> None:
  """Tells the supervisor the run made progress; updates the fields given (phase, step, the
  newest intact checkpoint's step, the watchdog's timeout)."""
  global _fd
  fd = _pipe()
  if fd < 0:
    return
  try:
    message = {"phase": None if phase is None else str(phase),
               "step": None if step is None else int(step),
               "stall_s": None if stall_s is None else float(stall_s)}
    message = {k: v for k, v in message.items() if v is not None}
    if ckpt is not _UNSET:
      message["ckpt"] = None if ckpt is None else int(ckpt)
    os.write(fd, json.dumps(message).encode() + b"\n")  # < PIPE_BUF: written whole or not
  except BlockingIOError:
    pass  # the pipe is full: the next beat says the same
  except OSError:  # EPIPE, EBADF: no supervisor to tell any more
    _fd = -1
  except (TypeError, ValueError):
    pass  # a field that is no number: the beat is still not worth an exception in a step


def install_stack_dump() -> None:
  """Supervised: SIGUSR1 writes every thread's Python stack to stderr. The watchdog sends it
  before it kills a stalled run, and the supervisor puts stderr into the report."""
  if supervised():
    try:  # fd 2, not sys.stderr: a library may have replaced that object
      faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)
    except (OSError, RuntimeError, ValueError):
      pass  # no stacks in the report; the watchdog still ends the run
