"""Video files -> frames (and the audio track) on the host, with PyAV (FFmpeg; no JAX).

`load_video` turns an mp4 / webm / avi (anything FFmpeg reads) into uint8[F, S, S, 3]
frames, each fitted to S x S like an image (`media.fit`), plus, when asked, the file's
audio track as mono float32 at 16 kHz (`audio.load_audio`). Frame sampling:

- uniform: of the clip's N frames, frame floor((k + 1/2) N / F) for k < F, the middle frame
  of each of F equal parts, so the F frames cover the whole clip whatever its length (TSN;
  LLaVA-NeXT-Video samples the whole clip too). N < F repeats frames.
- fps: the frame on screen at t0 + j / fps (t0 the first frame's time) for every j that
  stays within the clip; more than F such frames are thinned by the uniform rule, fewer are
  padded by repeating the last one, so a fixed F always comes back.

The frames are chosen from packet timestamps (a demux pass, which decodes nothing), then
one decode pass from the start stops after the last chosen frame and converts only the
chosen ones to RGB. Failures raise `BadRecord`: missing_video for a path that does not
exist; corrupt_video for a file that FFmpeg cannot read, one without a decodable frame, or
one without an audio track when `with_audio` asks for it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from mm_jax.data import audio, media
from mm_jax.data.errors import CORRUPT_AUDIO, CORRUPT_VIDEO, MISSING_VIDEO, BadRecord

SAMPLINGS = ("uniform", "fps")
# Timestamps are exact fractions turned into floats; this absorbs the rounding.
_EPS = 1e-6


class _Unusable(ValueError):
  """A file that opened but holds no usable video (the message is the BadRecord detail)."""


def load_video(data: bytes | str | os.PathLike, *, num_frames: int, size: int,
               sampling: str = "uniform", fps: float = 1.0, with_audio: bool = False,
               record_id: str | None = None, aspect: str = "resize",
               mean: Sequence[float] = (0.5, 0.5, 0.5)
               ) -> tuple[np.ndarray, np.ndarray | None]:
  """File bytes or a path -> (uint8[num_frames, size, size, 3], float32[N] 16 kHz or None).

  sampling/fps: see the module docstring. aspect/mean: as `media.preprocess` (`pad` fills
  with the mean colour). The waveform is the mono audio track when `with_audio`, else None.
  `record_id` defaults to the path.
  """
  where = "<bytes>" if isinstance(data, bytes) else os.fspath(data)
  record_id = where if record_id is None else record_id
  if sampling not in SAMPLINGS:
    raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
  if num_frames < 1 or (sampling == "fps" and fps <= 0):
    raise ValueError(f"need num_frames >= 1 and fps > 0, got {num_frames} and {fps}")
  if not isinstance(data, bytes) and not os.path.isfile(where):
    raise BadRecord(MISSING_VIDEO, record_id, f"{where}: no such file")
  try:
    times = _frame_times(data, with_audio)
    frames = _decode_at(data, _targets(times, num_frames, sampling, fps))
  except _Unusable as e:
    raise BadRecord(CORRUPT_VIDEO, record_id, f"{where}: {e}") from e
  except Exception as e:  # FFmpeg raises many exception types on malformed input
    raise BadRecord(CORRUPT_VIDEO, record_id, f"{where}: {type(e).__name__}: {e}") from e
  pixels = np.stack([media.fit(f, size=size, aspect=aspect, mean=mean) for f in frames])
  return pixels, (_track(data, record_id) if with_audio else None)


def _open(data: bytes | str):
  import av  # imported here: image-only runs never need FFmpeg

  return av.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def _frame_times(data: bytes | str, with_audio: bool) -> list[float]:
  """Sorted presentation times (s) of the first video stream's packets, without decoding."""
  with _open(data) as container:
    if not container.streams.video:
      raise _Unusable("no video stream")
    if with_audio and not container.streams.audio:
      raise _Unusable("no audio track (its <audio> tag asks for the video's sound)")
    stream = container.streams.video[0]
    times = sorted(float(p.pts * stream.time_base) for p in container.demux(stream)
                   if p.pts is not None and p.size)
  if not times:
    raise _Unusable("no video frames")
  return times


def _uniform(n: int, count: int) -> list[int]:
  """Indices of the middle item of each of `count` equal parts of range(n)."""
  return [(2 * k + 1) * n // (2 * count) for k in range(count)]


def _targets(times: list[float], count: int, sampling: str, fps: float) -> list[float]:
  """The `count` times (non-decreasing) whose on-screen frames are the samples."""
  if sampling == "uniform":
    return [times[i] for i in _uniform(len(times), count)]
  steps = int(np.floor((times[-1] - times[0]) * fps + _EPS)) + 1
  grid = [times[0] + j / fps for j in range(steps)]
  if steps > count:
    grid = [grid[i] for i in _uniform(steps, count)]
  return grid + [grid[-1]] * (count - len(grid))


def _decode_at(data: bytes | str, targets: list[float]) -> list[np.ndarray]:
  """uint8[H, W, 3] of the frame on screen at each target time (the last frame starting at
  or before it; the first frame for a time before any), decoding no further than needed."""
  out: list[np.ndarray] = []
  shown, rgb = None, None  # the frame on screen so far, and its pixels once converted
  with _open(data) as container:
    stream = container.streams.video[0]
    # One decoder thread: grain runs one decode per worker process, one worker per core;
    # FFmpeg's default (a thread per core in every worker) would oversubscribe the host.
    stream.codec_context.thread_count = 1
    for frame in container.decode(stream):
      t = frame.time if frame.time is not None else (0.0 if shown is None else shown.time)
      while len(out) < len(targets) and targets[len(out)] < t - _EPS:
        if rgb is None:
          rgb = (frame if shown is None else shown).to_ndarray(format="rgb24")
        out.append(rgb)
      if len(out) == len(targets):
        break
      shown, rgb = frame, None
    if shown is None and not out:
      raise _Unusable("no decodable frames")
    if len(out) < len(targets):  # targets at or past the last frame's start
      rgb = shown.to_ndarray(format="rgb24") if rgb is None else rgb
      out += [rgb] * (len(targets) - len(out))
  return out


def _track(data: bytes | str, record_id: str) -> np.ndarray:
  """The audio track, mono float32 at 16 kHz; a track that fails is the video's fault."""
  try:
    return audio.load_audio(data, record_id=record_id)
  except BadRecord as e:
    if e.reason != CORRUPT_AUDIO:
      raise
    raise BadRecord(CORRUPT_VIDEO, record_id, f"{e.detail} (its audio track)") from e


# Codecs that every PyAV wheel bundles, per container: (video, audio).
_WRITERS = {".mp4": ("mpeg4", "aac"), ".webm": ("libvpx", "libopus"),
            ".avi": ("mjpeg", "pcm_s16le")}


def write_video(path: str, frames: np.ndarray, *, fps: int, waveform: np.ndarray | None = None,
                sample_rate: int = audio.SAMPLE_RATE, codec: str | None = None) -> None:
  """Encodes uint8[N, H, W, 3] (H, W even) at `fps`, plus an optional mono float32 track.

  For tests, benchmarks and exports. Container by extension (.mp4, .webm, .avi) with the
  codecs of `_WRITERS`, or `codec` for the video; frame i starts at i / fps exactly.
  """
  import av

  ext = os.path.splitext(path)[1].lower()
  vcodec, acodec = _WRITERS[ext]
  with av.open(path, "w") as container:
    stream = container.add_stream(codec or vcodec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    # mjpeg wants full-range YUV; the others the usual limited-range 4:2:0.
    stream.pix_fmt = "yuvj420p" if (codec or vcodec) == "mjpeg" else "yuv420p"
    sound = None
    if waveform is not None:
      rate = 48000 if acodec == "libopus" else sample_rate  # Opus runs at 48 kHz only
      sound = container.add_stream(acodec, rate=rate)
      waveform = audio.resample(np.asarray(waveform, np.float32), sample_rate, rate)
    for i, pixels in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
      frame.pts = i
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
    if sound is not None:
      frame = av.AudioFrame.from_ndarray(waveform[None], format="flt", layout="mono")
      frame.sample_rate, frame.pts = sound.rate, 0
      container.mux(sound.encode(frame))
      container.mux(sound.encode())
