"""metrics.jsonl + TensorBoard events + a human progress line; throughput and MFU.

One JSON object per logged step with at least `step`, `loss`, `lr`, `tokens_per_s`, `mfu`
(null where the device's peak is unknown, e.g. CPU) and counters such as `data/skipped`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import time

import jax

from mm_jax import paths, target
from mm_jax.config import ModelConfig
from mm_jax.faults import WriteError


def peak_flops_per_device(mesh: jax.sharding.Mesh | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of one device of `mesh` (else a local one), from the chip table
  in mm_jax/accelerators.py; None where unknown (CPU)."""
  return (target.Target.of_mesh(mesh) if mesh is not None else target.local()).peak_flops


def flops_per_step(cfg: ModelConfig, batch: int, seq_len: int, images: int,
                   params: dict[str, int], trainable: set[str] | frozenset = frozenset()
                   ) -> float:
  """Model FLOPs of one training step (Kaplan et al. 2020: 2 N per token forward).

  The backward costs 4 N more for a trained module, 2 N for a frozen one that gradients
  still pass through (the decoder in stage 1), nothing for a frozen tower at the front.
  Decoder attention adds 2 * 2 L B T^2 D forward (causal halves it, QK^T and PV).
  `trainable`: module names (as in `params`) with trainable parameters.
  """
  dec, vis = cfg.decoder, cfg.vision
  factor = lambda name, front: 6 if name in trainable else (2 if front else 4)
  dec_params = params.get("decoder", 0) - dec.vocab_size * dec.width
  tokens = batch * seq_len
  decoder = factor("decoder", False) * (dec_params * tokens
                                        + dec.depth * batch * seq_len**2 * dec.width)
  patches = vis.num_patches + (vis.kind == "clip")
  tower_front = "projectors/image" not in trainable
  vision = (factor("towers/image", tower_front) * params.get("towers/image", 0)
            + factor("projectors/image", True) * params.get("projectors/image", 0)) * patches
  return float(decoder + vision * images)


class MetricsWriter:
  """Appends to metrics.jsonl and TensorBoard. `resume_step`: the step the run restarts
  from; records after it (steps the restart replays) are dropped from both first, so a
  resumed run's metrics.jsonl has each step once. A record that cannot be written is a
  WriteError naming the file, raised in the caller at once."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled and jax.process_index() == 0
    self._tb = None
    if self.enabled:
      paths.makedirs(workdir)
      keep = None if resume_step is None else (lambda lines: _records_up_to(lines, resume_step))
      self._jsonl = paths.LineLog(paths.join(workdir, "metrics.jsonl"), keep=keep)
      self._tb_dir = paths.LocalMirror(paths.join(workdir, "tensorboard"))
      self._tb = EventFile(self._tb_dir.local,
                           purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _py(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record, allow_nan=False))
    self._tb.scalars(step, {k: v for k, v in record.items() if k != "step" and
                            isinstance(v, (int, float)) and not isinstance(v, bool)})
    self._tb_dir.sync()

  def close(self) -> None:
    """Closes both files (WriteError if the last lines cannot be written)."""
    if self.enabled:
      self.enabled = False
      try:
        self._jsonl.close()
      finally:
        self._tb.close()
      self._tb_dir.sync()


class EventFile:
  """A TensorBoard event file, written synchronously by the caller.

  tensorboardX's SummaryWriter writes from a thread behind a bounded queue: when that
  thread died on a full disk, the next add_scalar blocked the training thread forever.
  Here a failed write is a WriteError naming the file, in the caller, at once. A few
  scalars every log_every steps cost nothing to write in line."""

  def __init__(self, directory: str, *, purge_step: int | None = None):
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.record_writer import RecordWriter

    self._event = Event
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(directory, name)
    try:
      self._writer = RecordWriter(self.path)
    except OSError as e:
      raise WriteError.of(self.path, e) from None
    first = [Event(wall_time=time.time(), file_version="brain.Event:2")]
    if purge_step is not None:  # TensorBoard hides the replayed steps after it
      first.append(Event(wall_time=time.time(), step=purge_step,
                         session_log=SessionLog(status=SessionLog.START)))
    self._write(first)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    from tensorboardX.summary import scalar

    now = time.time()
    self._write([self._event(wall_time=now, step=int(step), summary=scalar(k, float(v)))
                 for k, v in values.items()])

  def _write(self, events) -> None:
    try:
      for e in events:
        self._writer.write(e.SerializeToString())
      self._writer.flush()
    except OSError as e:
      raise WriteError.of(self.path, e) from None

  def close(self) -> None:
    with contextlib.suppress(OSError):  # a failed flush was reported by _write
      self._writer.close()


def _py(v):
  """A JSON value: numpy scalars unwrapped, NaN and inf as null (bare NaN is not JSON)."""
  if isinstance(v, dict):
    return {k: _py(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_py(x) for x in v]
  try:
    v = v.item()
  except (AttributeError, ValueError):  # ValueError: an array of several values
    v = v.tolist() if hasattr(v, "tolist") else v
    return _py(v) if isinstance(v, list) else v
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def _records_up_to(lines: list[str], step: int) -> list[str]:
  """The records of steps <= `step` (a resume replays the rest; a torn line is dropped)."""
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      continue
  return kept


class Throughput:
  """Tokens/s, step time and ETA over the window since the last report."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self.t0, self.step0, self.tokens = time.perf_counter(), start_step, 0

  def add(self, tokens: int) -> None:
    self.tokens += tokens

  def report(self, step: int) -> dict:
    now = time.perf_counter()
    dt, steps = now - self.t0, max(step - self.step0, 1)
    out = {"tokens_per_s": self.tokens / dt, "step_time_s": dt / steps,
           "eta_s": dt / steps * (self.total - step)}
    self.t0, self.step0, self.tokens = now, step, 0
    return out


class LossWindow:
  """The mean training loss over the steps since the last report, summed on the device
  (no host sync per step); non-finite steps (applied as no-ops) are left out."""

  def __init__(self):
    self._add = jax.jit(lambda total, n, loss, skipped: (
        total + jax.numpy.where(skipped > 0, 0.0, loss), n + 1 - skipped))
    self.reset()

  def reset(self) -> None:
    self.total, self.n, self.steps = 0.0, 0, 0

  def add(self, m: dict) -> None:
    self.total, self.n = self._add(self.total, self.n, m["loss"], m["skipped_nonfinite"])
    self.steps += 1

  def report(self) -> dict:
    """{"loss_mean": mean or None when every step was skipped, "loss_window": steps}."""
    n = int(jax.device_get(self.n))
    out = {"loss_mean": float(jax.device_get(self.total)) / n if n else None,
           "loss_window": self.steps}
    self.reset()
    return out


def progress_line(step: int, total: int, m: dict) -> str:
  """One line per log_every steps; its loss is the mean over those steps."""
  eta = datetime.timedelta(seconds=int(m.get("eta_s", 0)))
  mean = m.get("loss_mean")
  loss = (f"loss {mean:.4f} (mean of {m['loss_window']})" if mean is not None and
          m.get("loss_window", 1) > 1 else f"loss {m['loss']:.4f}")
  return (f"step {step}/{total} {loss} acc {m.get('accuracy', 0):.3f} "
          f"lr {m['lr']:.2e} tok/s {m['tokens_per_s']:,.0f} step {m['step_time_s']:.3f}s "
          f"eta {eta}")


def log(line: str) -> None:
  """Progress goes to stdout on process 0 (library INFO logs are silenced in main.py). A
  console that cannot be written (stdout redirected to a full disk) does not stop the run:
  metrics.jsonl holds the same figures and fails loudly itself."""
  if jax.process_index() == 0:
    with contextlib.suppress(OSError):
      print(line, flush=True)
