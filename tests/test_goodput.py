"""Goodput recorder and report on synthetic histories with a controlled clock (no JAX)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mm_jax import goodput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
  """Stands in for time.time(): each event is logged at the time the test sets."""

  def __init__(self, monkeypatch):
    self.t = 0.0
    monkeypatch.setattr(goodput.time, "time", lambda: self.t)

  def emit(self, rec: goodput.Recorder, t: float, name: str, **fields) -> None:
    self.t = t
    rec.event(name, **fields)


@pytest.fixture
def clock(monkeypatch):
  return Clock(monkeypatch)


def _train(clock, rec, t, first, last, dur, wait):
  clock.emit(rec, t, "train", first_step=first, last_step=last, dur_s=dur, data_wait_s=wait)


def _killed_attempt(clock, workdir):
  """Attempt 1: init, trains 1-30, saves at 20, SIGKILLed (no end) after the 21-30 window."""
  rec = goodput.Recorder(workdir)
  clock.emit(rec, 1000, "start", mode="train")
  clock.emit(rec, 1005, "init", dur_s=3)  # startup 2 s
  clock.emit(rec, 1015, "compile", dur_s=10)
  _train(clock, rec, 1035, 1, 10, 20, 2)
  _train(clock, rec, 1055, 11, 20, 20, 2)
  clock.emit(rec, 1061, "checkpoint_save", step=20, dur_s=5)  # other 1 s
  _train(clock, rec, 1081, 21, 30, 20, 2)
  rec.close()


def _resumed_attempt(clock, workdir, t0):
  """Attempt 2 from t0: restores step 20, trains 21-40, saves and finishes."""
  rec = goodput.Recorder(workdir)
  clock.emit(rec, t0, "start", mode="train")
  clock.emit(rec, t0 + 9, "restore", step=20, dur_s=4)  # startup 5 s
  clock.emit(rec, t0 + 17, "compile", dur_s=8)
  _train(clock, rec, t0 + 37, 21, 30, 20, 1)
  _train(clock, rec, t0 + 57, 31, 40, 20, 1)
  clock.emit(rec, t0 + 62, "checkpoint_save", step=40, dur_s=5)
  clock.emit(rec, t0 + 63, "end", status="finished", step=40)  # other 1 s
  rec.close()


def _assert_sums_to_wall(rep):
  total = rep["productive_s"] + sum(rep["lost_s"].values())
  assert math.isclose(total, rep["wall_s"], abs_tol=1e-6)


def test_sigkilled_attempt_then_restore(clock, tmp_path):
  _killed_attempt(clock, str(tmp_path))
  _resumed_attempt(clock, str(tmp_path), 1081 + 60)
  rep = goodput.report(str(tmp_path))
  assert rep["wall_s"] == pytest.approx(1204 - 1000)
  assert rep["productive_s"] == pytest.approx(18 + 18 + 19 + 19)
  lost = rep["lost_s"]
  assert lost["replayed"] == pytest.approx(18)  # steps 21-30 of attempt 1: 20 s - 2 s waiting
  assert lost["down"] == pytest.approx(60)
  assert lost["startup"] == pytest.approx(2 + 5)
  assert (lost["init"], lost["restore"], lost["compile"]) == pytest.approx((3, 4, 18))
  assert (lost["checkpoint_save"], lost["data_wait"], lost["other"]) == pytest.approx((10, 8, 2))
  _assert_sums_to_wall(rep)
  assert (rep["restarts"], rep["steps_replayed"], rep["malformed_lines"]) == (1, 10, 0)
  assert [a["ended"] for a in rep["attempts"]] == ["killed", "finished"]
  assert [a["resumed_from"] for a in rep["attempts"]] == [0, 20]
  assert [(a["first_step"], a["last_step"], a["steps"]) for a in rep["attempts"]] == [
      (1, 30, 30), (21, 40, 20)]


def test_preempted_attempt_loses_nothing(clock, tmp_path):
  rec = goodput.Recorder(str(tmp_path))
  clock.emit(rec, 0, "start", mode="train")
  clock.emit(rec, 1, "init", dur_s=1)
  _train(clock, rec, 11, 1, 20, 10, 0)
  clock.emit(rec, 12, "preempted", step=20)
  clock.emit(rec, 14, "checkpoint_save", step=20, dur_s=2)
  clock.emit(rec, 14, "end", status="preempted", step=20)
  rec.close()
  _resumed_attempt(clock, str(tmp_path), 100)
  rep = goodput.report(str(tmp_path))
  assert [a["ended"] for a in rep["attempts"]] == ["preempted", "finished"]
  assert rep["steps_replayed"] == 0 and rep["lost_s"]["replayed"] == 0
  assert rep["productive_s"] == pytest.approx(10 + 19 + 19)
  assert rep["lost_s"]["down"] == pytest.approx(100 - 14)
  _assert_sums_to_wall(rep)


def test_torn_last_line_is_skipped_and_the_next_attempt_kept(clock, tmp_path):
  rec = goodput.Recorder(str(tmp_path))
  clock.emit(rec, 0, "start", mode="train")
  clock.emit(rec, 1, "init", dur_s=1)
  _train(clock, rec, 31, 1, 30, 30, 0)
  rec.close()
  with open(tmp_path / goodput.FILENAME, "a") as f:
    f.write('{"time": 32, "event": "tra')  # SIGKILL mid-write
  _resumed_attempt(clock, str(tmp_path), 50)
  rep = goodput.report(str(tmp_path))
  assert rep["malformed_lines"] == 1 and "malformed" in rep["warnings"][0]
  assert [a["ended"] for a in rep["attempts"]] == ["killed", "finished"]  # its start survived
  # One window 1-30 and a restore from 20: a third of it is pro-rated as replayed.
  assert rep["lost_s"]["replayed"] == pytest.approx(10)
  assert rep["productive_s"] == pytest.approx(20 + 19 + 19)
  _assert_sums_to_wall(rep)
  assert "malformed lines 1" in goodput.format_report(rep)


def test_later_rollback_loses_earlier_steps():
  # Attempt 2 died before restoring; attempt 4 rolled back below attempt 3's checkpoint.
  assert goodput._keep_limits([0, None, 20, 10]) == [10, 10, 10, None]
  window = {"first_step": 11, "last_step": 20, "dur_s": 12.0, "data_wait_s": 2.0}
  assert goodput._split_window(window, 15) == pytest.approx((5.0, 5.0, 5))
  assert goodput._split_window(window, None) == pytest.approx((10.0, 0.0, 0))


def test_overlapping_durations_are_not_hidden(clock, tmp_path):
  rec = goodput.Recorder(str(tmp_path))
  clock.emit(rec, 0, "start", mode="train")
  clock.emit(rec, 1, "init", dur_s=1)
  _train(clock, rec, 11, 1, 10, 10, 0)
  clock.emit(rec, 12, "checkpoint_save", step=10, dur_s=30)  # longer than the whole run
  rec.close()
  rep = goodput.report(str(tmp_path))
  assert rep["lost_s"]["other"] == pytest.approx(-29)
  assert any("other" in w for w in rep["warnings"])


def test_values_are_plain_json(clock, tmp_path, monkeypatch):
  synced = []
  monkeypatch.setattr(goodput.os, "fsync", synced.append)
  rec = goodput.Recorder(str(tmp_path / "new" / "dir"))
  clock.emit(rec, 5, "start", mode="train")
  clock.emit(rec, 6, "eval", step=np.int64(3), dur_s=np.float32(0.5),
             loss=float("nan"), extra={"x": np.array([1.0, np.inf])}, time=-1)
  rec.close()
  rec.close()  # idempotent
  lines = (tmp_path / "new" / "dir" / goodput.FILENAME).read_text().splitlines()
  first, second = (json.loads(line) for line in lines)
  assert first == {"time": 5, "event": "start", "attempt": rec.attempt, "mode": "train"}
  assert second == {"time": 6, "event": "eval", "attempt": rec.attempt, "step": 3,
                    "dur_s": 0.5, "loss": None, "extra": {"x": [1.0, None]}}
  assert len(synced) == 1  # start only


def test_disabled_recorder_writes_nothing(tmp_path):
  rec = goodput.Recorder(str(tmp_path / "w"), enabled=False)
  rec.event("start", mode="train")
  rec.close()
  assert not (tmp_path / "w").exists()


def test_attempt_ids_differ_within_a_process(tmp_path):
  a, b = goodput.Recorder(str(tmp_path)), goodput.Recorder(str(tmp_path))
  assert a.attempt != b.attempt
  a.close()
  b.close()


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mm_jax.goodput", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def test_cli_prints_goodput(clock, tmp_path):
  _killed_attempt(clock, str(tmp_path))
  _resumed_attempt(clock, str(tmp_path), 1141)
  out = _cli(str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith(f"goodput {100 * 74 / 204:.1f}%")
  assert "replayed" in out.stdout and "killed" in out.stdout
  rep = json.loads(_cli(str(tmp_path), "--json").stdout)
  assert rep["steps_replayed"] == 10


def test_missing_or_empty_file_is_a_one_line_error(tmp_path):
  out = _cli(str(tmp_path))
  path = os.path.join(str(tmp_path), goodput.FILENAME)
  assert out.returncode == 1 and out.stdout == ""
  assert out.stderr.strip().splitlines() == [f"goodput: no events in {path} (missing)"]
  (tmp_path / goodput.FILENAME).write_text("")
  with pytest.raises(SystemExit, match="empty"):
    goodput.report(str(tmp_path))
