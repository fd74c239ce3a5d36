"""Per-kind and per-question eval accuracy (train/loop._accuracy_by_kind)."""

import numpy as np

from mm_jax.train.loop import _accuracy_by_kind


def test_kinds_sum_their_questions_and_plain_kinds_pass_through():
  names = ("video/colour", "video/direction", "audio/pitch", "xor", "binding")
  counts = np.array([[9, 10], [1, 10], [5, 5], [3, 6], [0, 0]])  # [label, (exact, answers)]
  got = _accuracy_by_kind(names, counts)
  assert got == {"eval/accuracy/video": 0.5, "eval/accuracy/audio": 1.0,
                 "eval/accuracy/xor": 0.5, "eval/accuracy/video/colour": 0.9,
                 "eval/accuracy/video/direction": 0.1, "eval/accuracy/audio/pitch": 1.0}
  # A label no eval sample had is left out rather than reported as 0 of 0.
  assert "eval/accuracy/binding" not in got
