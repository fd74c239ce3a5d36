"""Time slots shared by the data pipeline and the model (no jax needed: data workers use it).

A clip's time is cut into S = video.num_frames equal slots, frame k being slot k
(models/timecode.py explains why). The pipeline orders interleaved placeholders by slot and
the model adds each slot's time code, so both must count tokens into slots identically.
"""

from __future__ import annotations


def audio_slots(index, num_valid, slots: int):
  """Slot of audio token `index` of a clip with `num_valid` tokens: floor of its centre
  (index + 1/2) / num_valid times `slots`, clipped to the last slot (padding tokens).
  index: an int array (numpy or jax); num_valid >= 1, broadcasting against it.

  Integer arithmetic, so numpy (data/pipeline.av_tags) and jax agree exactly. E.g. 25
  tokens, 4 slots: tokens 0-5 -> 0, 6-11 -> 1, 12-18 -> 2, 19-24 -> 3.
  """
  return (((2 * index + 1) * slots) // (2 * num_valid)).clip(0, slots - 1)
