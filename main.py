"""mm_jax entry point: flags -> config -> mm_jax.run.main.

  python main.py --config=configs/llava.py:tiny --workdir=/tmp/tiny
  python main.py --config=configs/llava.py:7b,stage=pretrain --dry_run
  python main.py --config=configs/llava.py:7b,stage=finetune --dry_run --target=v5p-16
  python -m mm_jax.data.export --out=runs/shapes   # the shapes set as files
  python main.py --mode=generate --workdir=/tmp/tiny \
      --image=runs/shapes/images/eval_4.png --prompt="what shape is it?"
"""

import os
import re
import signal
import sys

from mm_jax import supervise


def _stopped_early(signum, frame) -> None:
  """A stop signal before training has a state: nothing to save; say so and exit 42 (the
  scheduler's "restart me"). Installed before anything else is imported."""
  del frame
  os.write(2, f"{signal.Signals(signum).name} received before training started: nothing "
              "to save, nothing lost; exit 42\n".encode())
  os._exit(42)


if __name__ == "__main__":
  if supervise.wanted(sys.argv):  # training: a parent that turns crashes into one line
    sys.exit(supervise.run(sys.argv, dump_dir=supervise.dump_dir(sys.argv)))
  if supervise.training(sys.argv):
    for _sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(_sig, _stopped_early)
  # A file-size limit (RLIMIT_FSIZE) fails the write with EFBIG, reported in one line like a
  # full disk, instead of killing the process with SIGXFSZ and a core dump.
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

import logging as std_logging  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mm_jax import cli, heartbeat  # noqa: E402

_DEBUG_ARGS = ("--debug", "-debug")


def _fail_at_start(error: BaseException) -> None:
  """A flag or config that does not parse: one line naming the key or file (the traceback
  only with --debug)."""
  if any(a in _DEBUG_ARGS for a in sys.argv):
    raise error
  print(cli.explain(sys.argv[1:], error), file=sys.stderr, flush=True)
  sys.exit(1)


try:  # ml_collections reads the --config.* overrides of sys.argv here already
  _CONFIG = config_flags.DEFINE_config_file("config", cli.DEFAULT_CONFIG, "Run config.")
except Exception as e:  # noqa: BLE001 - reported in one line
  _fail_at_start(e)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config.json.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "generate"], "What to do.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build abstractly, print parameter counts.")
_MEMORY_PLAN = flags.DEFINE_bool(
    "memory_plan", True, "--dry_run: also compile the train step for the mesh and print "
    "XLA's per-device memory plan (a big preset compiles for a minute; --nomemory_plan "
    "skips it).")
_TARGET = flags.DEFINE_string(
    "target", None, "Compile for this machine instead of this host (implies --dry_run): a "
    "TPU slice v5e-N, v5p-N, v6e-N (--target_slices), a GPU machine a3-highgpu-8g, "
    "a3-megagpu-8g, a3-ultragpu-8g, a2-ultragpu-8g, a4-highgpu-8g (--target_nodes) or "
    "<gpu>x<count> (h100x8, h200x8, a100x8). Needs jax[tpu] or jax[cuda12] installed; no "
    "device. Ends with 'NAME: P GiB per chip of H GiB: fits' (exit 0) or 'does not fit' (1).")
_TARGET_SLICES = flags.DEFINE_integer("target_slices", 1, "--target: TPU slices (multislice).")
_TARGET_NODES = flags.DEFINE_integer("target_nodes", 1, "--target: GPU nodes.")
_PROMPT = flags.DEFINE_string("prompt", "", "--mode=generate: the user's question.")
_IMAGE = flags.DEFINE_multi_string("image", [], "--mode=generate: image file(s), in order.")
_VIDEO = flags.DEFINE_multi_string("video", [], "--mode=generate: video file(s), in order.")
_AUDIO = flags.DEFINE_multi_string("audio", [], "--mode=generate: audio file(s), in order.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (every "
                                  "key, as --config.<key>= overrides it) and exit.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks instead of one-line errors.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Start jax.distributed even where mm_jax.distributed detects one "
    "process (jax's own cluster detection). Multi-process environments (TPU pods, "
    "JAX_COORDINATOR_ADDRESS, Slurm) are detected without it.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (with "
                                   "--num_processes and --process_id; else from the env).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_START_TIMEOUT = flags.DEFINE_integer("distributed_timeout_s", 300,
                                      "Seconds to wait for every process to join.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 100, "A process silent this "
                                  "long is dead: the others stop.")


def start_distributed() -> None:
  from mm_jax import distributed

  cluster = distributed.detect(coordinator=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  if cluster.source == "single" and _DISTRIBUTED.value:
    jax.distributed.initialize(initialization_timeout=_START_TIMEOUT.value)
    return
  distributed.initialize(cluster, timeout_s=_START_TIMEOUT.value,
                         heartbeat_timeout_s=_HEARTBEAT.value)


class _NoLibraryTracebacks(std_logging.Filter):
  """orbax logs a page of traceback per background thread when a save fails; the run
  reports that failure itself, in one line (mm_jax/train/checkpoint.py)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    # asyncio: "Future exception was never retrieved", the same failure once per write.
    return not (record.exc_info and "/orbax/" in record.pathname or record.name == "asyncio")


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    # absl's help flags print the usage to stdout, then exit 1; asked for, it is a success.
    asked = any(a.lstrip("-").partition("=")[0] in _HELP_FLAGS for a in argv[1:])
    sys.exit(0 if asked and e.code == 1 else e.code)
  except Exception as e:  # noqa: BLE001 - reported in one line
    _fail_at_start(e)


def _excepthook(kind, value, tb, default=sys.excepthook):
  # tensorstore callbacks of an abandoned orbax read land on an event loop orbax already
  # closed; they are noise after a failure that was reported in one line.
  if kind is RuntimeError and str(value) == "Event loop is closed":
    return
  default(kind, value, tb)


def _quiet_closed_loops() -> None:
  """After a failed save, tensorstore's callbacks for the writes still in flight call
  call_soon_threadsafe on the event loop orbax already closed, and tensorstore prints each
  RuntimeError with PyErr_Print from its own threads (hundreds of tracebacks; no Python
  hook sees them). The failure itself is reported in one line; such a late callback has
  nobody left to run it, so it is dropped instead."""
  import asyncio.base_events as base_events

  call = base_events.BaseEventLoop.call_soon_threadsafe

  def call_soon_threadsafe(self, callback, *args, **kwargs):
    if self.is_closed():
      return None
    return call(self, callback, *args, **kwargs)

  base_events.BaseEventLoop.call_soon_threadsafe = call_soon_threadsafe


def main(argv):
  del argv
  _quiet_closed_loops()
  heartbeat.install_stack_dump()  # supervised: the watchdog's SIGUSR1 dumps every stack
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  logging.get_absl_handler().addFilter(_NoLibraryTracebacks())
  sys.excepthook = _excepthook
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
  from mm_jax import config, faults, run
  from mm_jax.aot import TargetError
  from mm_jax.data.errors import BadRecord
  from mm_jax.data.skips import DataError
  from mm_jax.distributed import DistributedError
  from mm_jax.infer.prompts import PromptError
  from mm_jax.train.compile_check import CompileFailed

  # Exit codes (mm_jax/faults.py): 0 finished, 42 preempted (restart me), 3 diverged,
  # 1 any other error. Every message is one line; tracebacks only with --debug.
  try:  # ml_collections loads a --config file lazily, on first access
    cd = _CONFIG.value
    cd.to_dict()  # a file that failed to load raises here, not above
  except Exception as e:  # noqa: BLE001 - reported in one line
    _fail_at_start(e)
  machine = _target_machine()
  try:
    if machine is None:  # a compile for another machine is one process, whatever the env
      start_distributed()
    result = run.main(cd, _WORKDIR.value, _MODE.value, _DRY_RUN.value or machine is not None,
                      prompt=_PROMPT.value, images=tuple(_IMAGE.value),
                      videos=tuple(_VIDEO.value), audios=tuple(_AUDIO.value),
                      explicit=cli.explicit_keys(sys.argv[1:]), print_config=_PRINT_CONFIG.value,
                      memory_plan=_MEMORY_PLAN.value, machine=machine)
    if isinstance(result, dict) and result.get("fits") is False:  # said "does not fit"
      _exit("", 1)
  except (faults.Preempted, faults.Diverged) as e:
    _exit(str(e), e.exit_code, teardown=not getattr(e, "abandoned", False))
  except KeyboardInterrupt:  # before training installed its handlers: nothing to save
    _exit("interrupted before training started: nothing to save")
  except Exception as e:  # noqa: BLE001 - one line each; --debug re-raises
    if _DEBUG.value:
      raise
    if _peer_lost(e):  # a peer's death, seen here as a failed collective
      _exit(f"peer lost: another process of the job stopped ({cli._first_line(e)[:160]}); "
            f"exit {faults.EXIT_LOST}: restart the job (it resumes from the newest "
            "checkpoint)", faults.EXIT_LOST)
    known = {faults.CheckpointError: "checkpoint error", config.ConfigError: "config error",
             faults.WriteError: "error",
             DataError: "data error", DistributedError: "", PromptError: "error",
             BadRecord: "error", FileNotFoundError: "error", TargetError: "",
             CompileFailed: f"mm_jax: {_TARGET.value or 'cpu'}"}
    kind = next((v for k, v in known.items() if isinstance(e, k)), None)
    if kind is None:  # not a start-up or data error we know: keep the traceback in a file
      _exit(f"error: {type(e).__name__}: {cli._first_line(e)} (traceback in "
            f"{_save_traceback()}; --debug prints it)")
    _exit(f"{kind}: {e}" if kind else str(e))


_PEER_GONE = re.compile(r"gloo|connection (reset|closed|refused)|socket closed|broken pipe|"
                        r"coordination service|heartbeat|unavailable|deadline_exceeded|"
                        r"peer", re.IGNORECASE)


def _peer_lost(e: BaseException) -> bool:
  """A runtime error from a collective or the coordination service of a job of several
  processes: the usual form of another process's death (the run itself is fine)."""
  return (jax.process_count() > 1 and "RuntimeError" in type(e).__name__
          and bool(_PEER_GONE.search(str(e))))


def _target_machine():
  """The --target machine, with the compilers' settings made before JAX starts its backends;
  a name that is not a target is one line, exit 1."""
  if not _TARGET.value:
    return None
  from mm_jax import accelerators, aot

  try:
    machine = accelerators.machine(_TARGET.value, slices=_TARGET_SLICES.value,
                                   nodes=_TARGET_NODES.value)
  except ValueError as e:
    _exit(f"config error: --target: {e}")
  aot.prepare(machine)
  return machine


def _save_traceback() -> str:
  import tempfile
  import traceback

  fd, path = tempfile.mkstemp(prefix="mm_jax-traceback-", suffix=".txt")
  with os.fdopen(fd, "w") as f:
    traceback.print_exc(file=f)
  return path


def _exit(message: str, code: int = 1, teardown: bool = True) -> None:
  if message:
    print(message, file=sys.stderr, flush=True)
  # A clean stop: every process shuts jax.distributed down together. Not after a save given
  # up at the grace period's end: the teardown would wait for it, past the kill.
  if code in (0, 42) and teardown:
    sys.exit(code)
  # An error: the workdir is already closed (checkpoints waited for, metrics flushed).
  # Skip the interpreter's teardown: after a failed save orbax's leftover threads print
  # pages there, and jax.distributed's shutdown barrier would wait for peers that may
  # be gone (up to its heartbeat timeout) before the exit code reaches the scheduler.
  sys.stdout.flush()
  os._exit(code)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
