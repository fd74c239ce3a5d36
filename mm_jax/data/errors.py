"""`BadRecord`: one data record that cannot become a sample, with a countable reason.

Real data sets carry some broken records (a missing image, a corrupt JPEG, a conversation
whose `<image>` tags do not match its images). The pipeline skips them and counts them
by `reason`, so the reasons are a small fixed set rather than free text.
"""

from __future__ import annotations

MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TAG_MISMATCH = "tag_mismatch"
BAD_CONVERSATION = "bad_conversation"
BAD_JSON = "bad_json"
TOO_LONG = "too_long"
TOO_MANY_IMAGES = "too_many_images"  # more images than data.images_per_sample (pipeline.py)
NOT_UTF8 = "not_utf8"
MISSING_AUDIO = "missing_audio"
CORRUPT_AUDIO = "corrupt_audio"
MISSING_VIDEO = "missing_video"
CORRUPT_VIDEO = "corrupt_video"  # unreadable, too few frames, or no audio track when asked
TOO_MANY_MEDIA = "too_many_media"  # more videos / audio clips than slots per sample

REASONS = frozenset({MISSING_IMAGE, CORRUPT_IMAGE, TAG_MISMATCH, BAD_CONVERSATION, BAD_JSON,
                     TOO_LONG, TOO_MANY_IMAGES, NOT_UTF8, MISSING_AUDIO, CORRUPT_AUDIO,
                     MISSING_VIDEO, CORRUPT_VIDEO, TOO_MANY_MEDIA})


class BadRecord(ValueError):
  """A record to skip: `reason` (one of REASONS), `record_id`, and a human-readable detail."""

  def __init__(self, reason: str, record_id: str, detail: str):
    if reason not in REASONS:
      raise ValueError(f"unknown BadRecord reason {reason!r}; expected one of {sorted(REASONS)}")
    super().__init__(f"record {record_id}: {reason}: {detail}")
    self.reason = reason
    self.record_id = record_id
    self.detail = detail

  def __reduce__(self):
    # Records and their errors cross grain worker processes; the default exception pickling
    # would call BadRecord(message) and fail on the missing arguments.
    return (type(self), (self.reason, self.record_id, self.detail))
