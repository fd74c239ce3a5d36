"""Every file a run writes, on a local path and on gs:// (an in-memory fake of GCS)."""

import json

import fsspec
import pytest
from conftest import tiny_config
from fsspec.implementations.memory import MemoryFileSystem

from mm_jax import goodput, paths
from mm_jax.train import metrics as metrics_lib
from mm_jax.train import workdir as workdir_lib


class FakeGCS(MemoryFileSystem):
  """gs:// kept in memory, with GCS's limits: objects are written whole, never appended."""

  protocol = ("gs", "gcs")
  store: dict = {}  # noqa: RUF012  (fsspec's own convention: class-level storage)
  pseudo_dirs = [""]  # noqa: RUF012

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise OSError("GCS objects cannot be appended to")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs():
  for name in FakeGCS.protocol:  # epath asks fsspec for "gcs"
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  yield "gs://bucket/run"
  FakeGCS.store.clear()


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
  return request.getfixturevalue("gcs") if request.param == "gcs" else str(tmp_path / "run")


def _lines(path):
  return [json.loads(line) for line in paths.read_text(path).splitlines()]


def test_config_json_is_written_whole_and_read_back(workdir):
  cfg = tiny_config(**{"train.steps": 7})
  workdir_lib.check_writable(workdir)
  workdir_lib.write_config(cfg, workdir)
  assert workdir_lib.saved_config(workdir)["train"]["steps"] == 7
  assert workdir_lib.config_diff(workdir_lib.saved_config(workdir), cfg) == []
  assert sorted(paths.listdir(workdir)) == ["config.json"]  # no probe or temporary left


def test_metrics_append_and_a_resume_drops_the_replayed_steps(workdir):
  writer = metrics_lib.MetricsWriter(workdir)
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": 1.0 / step})
  # Visible before close: a reader of a week-long run sees every logged step.
  assert [r["step"] for r in _lines(paths.join(workdir, "metrics.jsonl"))] == [1, 2, 3, 4]
  writer.close()
  writer = metrics_lib.MetricsWriter(workdir, resume_step=2)
  writer.write(3, {"loss": 0.5})
  writer.close()
  records = _lines(paths.join(workdir, "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.5)]
  events = paths.listdir(paths.join(workdir, "tensorboard"))
  assert events and all(e.startswith("events.out.tfevents") for e in events)


def test_a_torn_last_line_is_ended_before_new_records(workdir):
  log = paths.join(workdir, "metrics.jsonl")
  paths.makedirs(workdir)
  paths.write_text(log, '{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # killed mid-write
  writer = metrics_lib.MetricsWriter(workdir, resume_step=1)
  writer.write(2, {"loss": 0.5})
  writer.close()
  assert [r["step"] for r in _lines(log)] == [1, 2]


def test_goodput_events_and_report(workdir):
  rec = goodput.Recorder(workdir)
  rec.event("start")
  rec.event("train", first_step=1, last_step=10, dur_s=2.0, data_wait_s=0.5)
  rec.event("end", step=10)
  rec.close()
  report = goodput.report(workdir)
  assert report["attempts"][0]["last_step"] == 10


def test_eval_json_and_the_run_config_read_back(workdir, tmp_path):
  from mm_jax.interop import hf

  cfg = tiny_config(**{"train.steps": 3})
  workdir_lib.write_config(cfg, workdir)
  assert hf.read_run_config(workdir).train.steps == 3
  out = paths.join(workdir, "eval_3.json")
  paths.write_text(out, json.dumps({"step": 3}))
  assert json.loads(paths.read_text(out)) == {"step": 3}


def test_paths_join_keeps_the_scheme():
  assert paths.join("gs://b/run", "checkpoints", "10") == "gs://b/run/checkpoints/10"
  assert paths.parent("gs://b/run/checkpoints") == "gs://b/run"
  assert paths.absolute("gs://b/run") == "gs://b/run"
  assert paths.join("runs/a", "x") == "runs/a/x"


def test_a_quarantined_step_moves_on_gcs(gcs):
  src, dst = paths.join(gcs, "checkpoints", "5"), paths.join(gcs, "checkpoints_unusable", "5")
  paths.makedirs(paths.join(src, "state"))
  paths.write_text(paths.join(src, "state", "a"), "x")
  paths.move(src, dst)
  assert not paths.exists(src)
  assert paths.read_text(paths.join(dst, "state", "a")) == "x"
