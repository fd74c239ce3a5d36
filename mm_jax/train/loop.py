"""run(): mesh -> data -> state -> restore -> loop -> hooks. Reads top to bottom."""

from __future__ import annotations

import contextlib
import functools
import time

import jax

from mm_jax import config as config_lib
from mm_jax import distributed, heartbeat, paths, sharding
from mm_jax import goodput as goodput_lib
from mm_jax.config import Config
from mm_jax.data import pipeline, skips
from mm_jax.faults import Diverged, Preempted, WriteError
from mm_jax.interop import hf_export
from mm_jax.train import base as base_lib
from mm_jax.train import batches, recovery, stopping
from mm_jax.train import evaluate as evaluate_lib
from mm_jax.train import lock as lock_lib
from mm_jax.train import metrics as metrics_lib
from mm_jax.train import state as state_lib
from mm_jax.train import workdir as workdir_lib
from mm_jax.train.checkpoint import QUARANTINE, Checkpointer
from mm_jax.train.step import train_step


def jit_train_step(built: state_lib.Built, batch_sh: dict, stop_sh):
  """The train step as training runs it: explicit shardings, the state donated (the memory
  plan of --dry_run compiles this same function, train/plan.py)."""
  return jax.jit(functools.partial(train_step, built.fns),
                 in_shardings=(built.shardings, batch_sh, stop_sh),
                 out_shardings=(built.shardings, None), donate_argnums=0)


def train(cfg: Config, workdir: str) -> dict:
  """Trains to `cfg.train.steps`, resuming from the newest checkpoint in `workdir` that
  verifies. Raises Preempted (exit 42) after saving when a stop signal arrives, Diverged
  (exit 3) after `train.max_nonfinite_steps` skipped steps in a row, CheckpointError when
  a save fails, WriteError when another file cannot be written, WorkdirBusy when another
  run holds the workdir (mm_jax/faults.py)."""
  heartbeat.beat("start", stall_s=cfg.train.stall_timeout_s)
  workdir_lib.check_writable(workdir)
  with lock_lib.job_lock(workdir, log=metrics_lib.log) as lock:  # before anything in the
    # workdir is touched
    mesh = sharding.make_mesh(cfg.mesh)
    batches.check_batch(cfg, mesh)
    goodput = goodput_lib.Recorder(workdir, enabled=jax.process_index() == 0)
    status, step = "error", 0
    ckpt = Checkpointer(paths.join(workdir, "checkpoints"), cfg.checkpoint)
    try:
      goodput.event("start", mode="train")
      run = _Run(cfg, workdir, mesh, ckpt, goodput, lock)
      state, start = run.start()  # until here a signal ends the run at once (main.py)
      with stopping.StopSignals() as signals:  # from here a signal stops at a step boundary
        try:
          result = run.loop(state, start, signals)
        finally:
          ckpt.close()  # waits for any async save: a crash never loses a checkpoint in flight
      status, step = "finished", cfg.train.steps
      return result
    except Preempted as e:
      status, step = "preempted", e.step
      raise
    except Diverged:
      status = "diverged"
      raise
    except WriteError as e:
      raise WriteError(f"{e}; newest intact checkpoint: {_newest(ckpt)}; free the space "
                       "(or fix the permission), then run the same command to resume") from None
    finally:
      ckpt.close()
      with contextlib.suppress(OSError):  # a full disk was reported above, once
        goodput.event("end", status=status, step=step)
        goodput.close()


# Of the stop's grace period, what the exit itself needs (closing files, the exit code's way
# to the scheduler): a save that would commit later than this before the kill is given up.
EXIT_MARGIN_S = 3.0


def _newest(ckpt: Checkpointer) -> str:
  step = ckpt.newest_intact
  return f"step {step} in {ckpt.directory}" if step else f"none in {ckpt.directory}"


class _Run:
  """One attempt of a training run: start or resume, then the step loop with its
  periodic hooks (log, eval, checkpoint, stop)."""

  def __init__(self, cfg: Config, workdir: str, mesh, ckpt: Checkpointer, goodput, lock):
    self.cfg, self.workdir, self.mesh, self.ckpt = cfg, workdir, mesh, ckpt
    self.goodput, self.lock = goodput, lock
    self.built = state_lib.build(cfg, mesh)
    self.spec = batches.row_spec(cfg)
    self.stats = skips.SkipStats()
    self.data = pipeline.train_iterator(cfg.data, self.spec, global_batch=cfg.train.batch_size,
                                        seed=cfg.train.seed, stats=self.stats)
    self.batch_sh = batches.batch_shardings(mesh, self.spec, cfg.train.batch_size)
    self.stop_sh = sharding.batch_sharding(mesh, 1)

  def start(self):
    """The state and its step: the newest checkpoint that verifies, else a fresh one."""
    cfg, t0 = self.cfg, time.perf_counter()
    heartbeat.beat("restore", ckpt=self.ckpt.newest_intact)
    with jax.set_mesh(self.mesh):
      state, start = recovery.restore_latest(self.built, cfg, self.ckpt, self.workdir,
                                             self.data)
      if state is None:
        state = state_lib.initialise(self.built, cfg)
        self.goodput.event("init", dur_s=time.perf_counter() - t0)
      else:
        self.goodput.event("restore", step=start, dur_s=time.perf_counter() - t0)
        metrics_lib.log(f"resumed from step {start} in {self.workdir}")
        saved = workdir_lib.saved_config(self.workdir) or self.ckpt.read_config(start)
        diff = workdir_lib.config_diff(saved, cfg)
        if diff:
          metrics_lib.log(f"config differs from the saved run: {workdir_lib.format_diff(diff)}")
      # A LoRA run's checkpoints hold the fingerprint of its frozen base, not the base.
      self.base = ({"fingerprint": base_lib.fingerprint(state.frozen),
                    "source": base_lib.source(cfg)} if base_lib.saves_base(cfg) else None)
    # Only now: a refused resume (another base, a bad checkpoint) leaves the run's record.
    workdir_lib.write_config(cfg, self.workdir)
    self.ckpt.vouch(start)  # resumed from: good, whatever followed it before
    return state, start

  def save(self, state, n: int, guard: stopping.StepGuard) -> bool:
    """Writes checkpoint `n` (async); False if not written: during a non-finite streak."""
    if guard.streak:  # the state is the one before the streak, which may be what caused it
      metrics_lib.log(f"checkpoint step {n} not written: step {n} applied no update "
                      f"(non-finite, {guard.streak} in a row)")
      return False
    if not self.lock.held():
      raise lock_lib.WorkdirBusy(f"--workdir={self.workdir}: this run no longer holds its "
                                 f"lock ({self.lock.path}): another run took it over; "
                                 f"stopping before checkpoint step {n}")
    heartbeat.beat("checkpoint save", step=n)
    t0 = time.perf_counter()
    self.ckpt.save(n, state, self.data, base=self.base,
                   counters={"skipped_nonfinite": guard.skipped_total},
                   config=config_lib.to_dict(self.cfg))
    self.goodput.event("checkpoint_save", step=n, dur_s=time.perf_counter() - t0)
    return True

  def evaluate(self, state, n: int, writer: metrics_lib.MetricsWriter) -> dict:
    """An eval of step `n`: to metrics.jsonl and WORKDIR/eval_<n>.json, as --mode=eval."""
    t0 = time.perf_counter()
    result = evaluate_lib.evaluate_state(self.cfg, self.built, state, self.mesh)
    self.goodput.event("eval", step=n, dur_s=time.perf_counter() - t0)
    writer.write(n, result)
    evaluate_lib.write_eval_json(self.cfg, self.workdir, n, result)
    return result

  def stopped(self, n: int, saved: bool, late: bool,
              signals: stopping.StopSignals) -> Preempted:
    """The stop after step `n`: its save committed (a restart finds it), or, `late` (no time
    was left to start it) or past the grace period's end, given up so the process exits 42
    before the scheduler's kill."""
    grace = self.cfg.train.stop_grace_s
    left = signals.left(grace)
    committed = self.ckpt.wait(None if left is None else max(left - EXIT_MARGIN_S, 0.0))
    if not committed:
      metrics_lib.log(f"checkpoint step {n} could not commit within "
                      f"config.train.stop_grace_s={grace:g} s of the {signals.received}: "
                      "abandoned (a restart never resumes from it)")
    why_not = "during a non-finite streak"
    if late or not committed:
      saved, why_not = False, f"in the {grace:g} s before the kill"
    step = n if saved else self.ckpt.newest_intact
    self.goodput.event("preempted", step=step or 0)
    # Abandoned: main.py exits at once, since the interpreter's teardown would wait for it.
    return Preempted(step, signals.received or "a stop signal on another process",
                     saved=saved, why_not=why_not, abandoned=not committed)

  def observe(self, guard: stopping.StepGuard, pending: list) -> None:
    """Reads the flags of the steps in `pending` (in order, emptied); a step that applied its
    update vouches for the checkpoint before it."""
    while pending:
      n, m = pending.pop(0)
      guard.observe(n, m)
      if not guard.streak:
        self.ckpt.vouch(n - 1)

  def diverged(self, e: Diverged) -> Diverged:
    """The streak's message with the resume point: checkpoints from one step before the
    streak on may hold the (finite but bad) state that started it, so they are set aside."""
    self.ckpt.wait()
    first = e.streak_start - 1
    suspect = [s for s in self.ckpt.all_steps() if s >= first]
    for s in suspect:
      self.ckpt.quarantine(s)
    left = self.ckpt.all_steps()
    moved = (f"checkpoint(s) {', '.join(map(str, suspect))} (from step {first} on, which "
             f"may hold the state that started it) moved to "
             f"{paths.join(self.workdir, QUARANTINE)}; " if suspect else "")
    if left:
      resume = f"the same command resumes from step {left[-1]}"
    elif suspect:
      resume = (f"no checkpoint before it is left: remove {paths.join(self.workdir, QUARANTINE)}"
                " to start over")
    else:
      resume = "no checkpoint was written before it: the same command starts over"
    return Diverged(f"{e}; {moved}{resume}, after lowering config.optim.lr or fixing the "
                    "data", step=e.step, streak_start=e.streak_start)

  def loop(self, state, start: int, signals: stopping.StopSignals) -> dict:
    cfg, total = self.cfg, self.cfg.train.steps
    if start >= total:  # restarting a finished run: nothing to train, nothing to append
      metrics_lib.log(f"the run in {self.workdir} finished at step {start} already; nothing "
                      "to do")
      return evaluate_lib.read_eval(self.workdir, start)
    guard = stopping.StepGuard(cfg.train.max_nonfinite_steps,
                               self.ckpt.read_counters(start).get("skipped_nonfinite", 0)
                               if start else 0)
    step_fn = jit_train_step(self.built, self.batch_sh, self.stop_sh)
    counts = state_lib.param_counts(self.built.abstract)
    flops = metrics_lib.flops_per_step(cfg.model, cfg.train.batch_size, self.spec.seq_len,
                                       cfg.train.batch_size * self.spec.images_per_sample,
                                       counts, state_lib.trainable_modules(self.built.abstract))
    peak = metrics_lib.peak_flops_per_device(self.mesh)
    writer = metrics_lib.MetricsWriter(self.workdir, resume_step=start)
    speed, window = metrics_lib.Throughput(start, total), _Window(self.goodput, start)
    losses = metrics_lib.LossWindow()
    last: dict = {}
    pending: list = []  # (step, metrics) whose flags are not read yet: read one step late
    one_process = jax.process_count() == 1
    try:
      with jax.set_mesh(self.mesh):
        heartbeat.beat("compile", step=start, ckpt=self.ckpt.newest_intact)
        for step in range(start, total):
          t0 = time.perf_counter()
          local = next(self.data)
          window.data_wait += time.perf_counter() - t0
          real = int((local["segment_ids"] > 0).sum())
          speed.add(real * jax.process_count())
          stop = jax.make_array_from_process_local_data(
              self.stop_sh, signals.rows(len(local["tokens"])))
          batch = pipeline.global_batch(local, self.batch_sh)
          if step == start and jax.process_count() > 1:
            # Compile, then meet: the first run's collectives rendezvous with a short
            # timeout, which a host still compiling would miss (distributed.barrier).
            step_fn = step_fn.lower(state, batch, stop).compile()
            distributed.barrier(f"train_step_compiled_{start}")
          state, m = step_fn(state, batch, stop)
          n = step + 1
          losses.add(m)
          self.observe(guard, pending)  # the step before: it is done by now
          pending.append((n, m))
          heartbeat.beat("train", step=n, ckpt=self.ckpt.newest_intact)
          if n == start + 1:  # the first step's time is XLA's compile
            jax.block_until_ready(m)
            self.goodput.event("compile", dur_s=time.perf_counter() - t0)
            window.restart(n)
          self.ckpt.poll()  # a failed async save stops the run now, not at the next save
          if one_process and signals.received:
            guard.stop = True  # no other process to agree with: stop after this step
          log = n % cfg.train.log_every == 0 or n == total
          evals = (cfg.train.eval_every and n % cfg.train.eval_every == 0 and n < total
                   and evaluate_lib.has_eval_data(cfg))
          saves = n < total and (n % cfg.checkpoint.every == 0 or guard.stop)
          if log or evals or saves:  # these wait for step n anyway: its flags first
            self.observe(guard, pending)
          if log:
            last = {**jax.device_get(m), **speed.report(n), **losses.report(),
                    **self.stats.metrics(),
                    "data/packing_efficiency": real / local["segment_ids"].size,
                    "train/skipped_nonfinite": guard.skipped_total}
            last["mfu"] = (flops / last["step_time_s"] / (peak * jax.device_count())
                           if peak else None)
            del last["stop"]
            writer.write(n, last)
            metrics_lib.log(metrics_lib.progress_line(n, total, last))
          if evals:
            window.flush(n)
            self.evaluate(state, n, writer)
            window.restart(n)
          saved = late = False
          if saves or (n < total and guard.stop):
            window.flush(n)
            left = signals.left(cfg.train.stop_grace_s) if guard.stop else None
            late = left is not None and left < EXIT_MARGIN_S
            if late:
              metrics_lib.log(f"checkpoint step {n} not written: {max(left, 0):.1f} s of "
                              f"config.train.stop_grace_s={cfg.train.stop_grace_s:g} left")
            else:
              saved = self.save(state, n, guard)
            window.restart(n)
          if guard.stop and n < total:
            raise self.stopped(n, saved, late, signals)
        self.observe(guard, pending)
        window.flush(total)
        if self.ckpt.latest_step() != total:
          self.save(state, total, guard)
        self.ckpt.wait()
        if not guard.streak:  # the run's result: no step follows to vouch for it
          self.ckpt.vouch(total)
        if not evaluate_lib.has_eval_data(cfg):
          metrics_lib.log("no held-out data (config.data.eval_json): final eval skipped")
          metrics_lib.log(outputs_note(self.workdir, total, evaluated=False,
                                       exportable=hf_export.exportable(cfg.model)))
          result = last
        else:
          heartbeat.beat("eval", step=total, ckpt=self.ckpt.newest_intact)
          result = {**last, **self.evaluate(state, total, writer)}
          # Only the eval's figures: the train ones of the last step were printed already.
          metrics_lib.log(f"final eval at step {total}: " + evaluate_lib.fmt(
              {k: v for k, v in result.items() if k.startswith("eval/")}))
          metrics_lib.log(outputs_note(self.workdir, total, evaluated=True,
                                       exportable=hf_export.exportable(cfg.model)))
    except BaseException as e:
      with contextlib.suppress(OSError):  # the error in flight is the one to report
        writer.close()
      if isinstance(e, Diverged):
        raise self.diverged(e) from None
      raise
    writer.close()
    return result


def outputs_note(workdir: str, step: int, evaluated: bool, exportable: bool = True) -> str:
  """What a finished run leaves and the commands that use it (printed at the end); the
  export command only for a model the export takes (hf_export.exportable)."""
  files = [f"checkpoints/{step}", "config.json", "metrics.jsonl", "tensorboard/",
           "goodput.jsonl"] + ([f"eval_{step}.json"] if evaluated else [])
  lines = [f"outputs in {workdir}: {', '.join(files)}",
           f"  eval again: python main.py --mode=eval --workdir={workdir}  (reads its config.json)"]
  if exportable:
    lines.append(f"  export:     python -m mm_jax.interop.hf export --workdir={workdir} "
                 f"--out={workdir.rstrip('/')}_hf")
  return "\n".join(lines)


class _Window:
  """Goodput `train` events: the wall time of a run of steps and its data wait, cut at
  every save, eval and the end so that those events' own time is not counted twice."""

  def __init__(self, goodput, step: int):
    self.goodput = goodput
    self.restart(step)

  def restart(self, step: int) -> None:
    self.first, self.t0, self.data_wait = step + 1, time.perf_counter(), 0.0

  def flush(self, last: int) -> None:
    if last >= self.first:
      self.goodput.event("train", first_step=self.first, last_step=last,
                         dur_s=time.perf_counter() - self.t0, data_wait_s=self.data_wait)
    self.restart(last)


