"""The TensorBoard event file is written in line: readable as TFRecords of Event protos, and a
write that fails is a WriteError naming the file at once (no writer thread to die)."""

import os
import struct

import pytest
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import RecordWriter

from mm_jax.faults import WriteError
from mm_jax.train import metrics as metrics_lib


def _events(path: str) -> list[Event]:
  """TFRecord framing: u64 length, u32 masked crc, data, u32 masked crc."""
  out, data = [], open(path, "rb").read()
  while data:
    (n,) = struct.unpack("<Q", data[:8])
    out.append(Event.FromString(data[12:12 + n]))
    data = data[12 + n + 4:]
  return out


def test_scalars_are_events_tensorboard_reads_with_the_purge_step(tmp_path):
  events = metrics_lib.EventFile(str(tmp_path), purge_step=7)
  events.scalars(8, {"loss": 0.5, "lr": 1e-3})
  events.close()
  (name,) = os.listdir(tmp_path)
  assert name.startswith("events.out.tfevents.")
  got = _events(os.path.join(tmp_path, name))
  assert got[0].file_version == "brain.Event:2"
  assert got[1].step == 7 and got[1].session_log.status == got[1].session_log.START
  values = {v.tag: (e.step, v.simple_value) for e in got[2:] for v in e.summary.value}
  assert values == {"loss": (8, 0.5), "lr": (8, pytest.approx(1e-3))}


def test_a_full_disk_is_a_write_error_in_the_caller(tmp_path):
  events = metrics_lib.EventFile(str(tmp_path))
  events._writer, events.path = RecordWriter("/dev/full"), "/dev/full"  # ENOSPC on flush
  with pytest.raises(WriteError, match=r"^cannot write /dev/full: No space left on device$"):
    events.scalars(1, {"loss": 1.0})
  events.close()  # after a failure: quiet
