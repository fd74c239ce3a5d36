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

The frames are chosen from packet timestamps (a demux pass, which decodes nothing), and
decoding then spends its time on the frames it returns (`_decode_planned`, in the same
container): per chosen frame it either decodes forward from where the decoder is or seeks
to the keyframe at or before it, whichever starts later (the demux pass saw every keyframe);
for H.264 and MPEG-1/2/4 it skips pictures that nothing predicts from, unless returned; it
stops at the last chosen frame and converts only the chosen ones to RGB. The pixels are those
of a decode of every frame from the start (`_decode_forward`, which a stream whose packets
the plan cannot trust still gets). Failures raise `BadRecord`: missing_video for a path that
does not exist; corrupt_video for a file that FFmpeg cannot read, one without a decodable
frame, or one without an audio track when `with_audio` asks for it.
"""

from __future__ import annotations

import bisect
import io
import os
from collections.abc import Sequence

import numpy as np

from mm_jax.data import audio, media
from mm_jax.data.errors import CORRUPT_AUDIO, CORRUPT_VIDEO, MISSING_VIDEO, BadRecord

SAMPLINGS = ("uniform", "fps")
# Timestamps are exact fractions turned into floats; this absorbs the rounding.
_EPS = 1e-6
# Decoders whose skip_frame=NONREF drops only pictures that no other picture predicts from,
# so every other frame decodes bit-identically: H.264 (nal_ref_idc 0) and the B-frames of
# MPEG-1/2/4 part 2. Not HEVC: its "sub-layer non-reference" pictures may still be
# references for higher temporal layers. Not VP8/VP9/AV1: nothing here shows it safe.
_SKIPS_NONREF = frozenset({"h264", "mpeg4", "mpeg1video", "mpeg2video"})


class _Unusable(ValueError):
  """A file that opened but holds no usable video (the message is the BadRecord detail)."""


class _Replan(Exception):
  """The stream did not decode as its packets promised: `_decode_forward` takes over."""


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
    frames = _sampled_frames(data, with_audio, num_frames, sampling, fps)
  except _Unusable as e:
    raise BadRecord(CORRUPT_VIDEO, record_id, f"{where}: {e}") from e
  except Exception as e:  # FFmpeg raises many exception types on malformed input
    raise BadRecord(CORRUPT_VIDEO, record_id, f"{where}: {type(e).__name__}: {e}") from e
  pixels = np.stack([media.fit(f, size=size, aspect=aspect, mean=mean) for f in frames])
  return pixels, (_track(data, record_id) if with_audio else None)


def _open(data: bytes | str):
  import av  # imported here: image-only runs never need FFmpeg

  return av.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def _sampled_frames(data: bytes | str, with_audio: bool, count: int, sampling: str,
                    fps: float) -> list[np.ndarray]:
  """uint8[H, W, 3] of each of the `count` sampled frames, in sampling order.

  One container serves the demux pass and `_decode_planned` (a second open would cost a
  probe, which decodes the first frame); `_decode_forward` opens its own.
  """
  import av

  with _open(data) as container:
    if not container.streams.video:
      raise _Unusable("no video stream")
    if with_audio and not container.streams.audio:
      raise _Unusable("no audio track (its <audio> tag asks for the video's sound)")
    stream = container.streams.video[0]
    demuxed = [(p.pts, p.is_keyframe, p.size) for p in container.demux(stream)]
    while demuxed and not demuxed[-1][2]:
      demuxed.pop()  # the empty packets that end PyAV's demux (they drain the decoder)
    packets = [(pts, key) for pts, key, size in demuxed if size]
    times = sorted(float(pts * stream.time_base) for pts, _ in packets if pts is not None)
    if not times:
      raise _Unusable("no video frames")
    targets = _targets(times, count, sampling, fps)
    # An empty packet mid-stream would drain the decoder of a decode from the start: leave
    # such a stream to that decode.
    plan = _plan(packets, stream.time_base, targets) if len(packets) == len(demuxed) else None
    if plan is not None:
      try:
        got = _decode_planned(container, stream, packets, plan)
        return [got[i] for i in plan]
      except (_Replan, av.FFmpegError):
        pass  # a stream that breaks the plan's assumptions, or damaged data: as before
  return _decode_forward(data, targets)


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


def _plan(packets: list[tuple[int | None, bool]], time_base,
          targets: list[float]) -> list[int] | None:
  """Index into `packets` (decode order) of the frame on screen at each target, or None for
  a stream whose frames `_decode_forward` must find by decoding (see `_decode_planned`).

  The frame on screen is the one `_decode_forward` returns, if every packet is one frame
  and the decoder shows frames at their packet times: the last frame with target >= its
  time - _EPS (the same float test), else the first frame.
  """
  pts = [p for p, _ in packets]
  if None in pts or len(set(pts)) < len(pts) or not packets[0][1]:
    return None  # frames without times, two frames at one time, or no keyframe to start
  order = sorted(range(len(pts)), key=pts.__getitem__)
  times = [float(pts[i] * time_base) for i in order]
  if any(a >= b for a, b in zip(times, times[1:], strict=False)):
    return None  # distinct timestamps that round to one float: ties that decoding breaks
  starts = [t - _EPS for t in times]
  return [order[max(bisect.bisect_right(starts, t) - 1, 0)] for t in targets]


def _decode_planned(container, stream, packets: list[tuple[int, bool]],
                    plan: list[int]) -> dict[int, np.ndarray]:
  """{packet index: uint8[H, W, 3]} of the frames of `plan`, decoding as little as it can.

  Walks the chosen frames in decode order. A frame decodes from the last keyframe before
  it whose time is not after its own (frames shown before their keyframe may predict from
  the previous one: open GOPs). When that keyframe lies ahead of the decoder, seeking there
  skips everything between, which can only save work; otherwise decoding goes on forward
  (so a clip with one keyframe is one run from the start). A run ends at its last chosen
  packet: draining the decoder hands over the frames it holds for reordering without
  decoding the packets after. Where `_SKIPS_NONREF` allows, pictures that are not chosen
  and that nothing predicts from are not decoded at all. Any surprise (the seek landing
  elsewhere, packets out of step with the demux pass, a frame at a time no packet has, a
  chosen frame that never comes out) raises _Replan.
  """
  import av

  ctx = stream.codec_context
  # One decoder thread: grain runs one decode per worker process, one worker per core;
  # FFmpeg's default (a thread per core in every worker) would oversubscribe the host.
  ctx.thread_count = 1
  skips = ctx.name in _SKIPS_NONREF
  pts = [p for p, _ in packets]
  index = {p: i for i, p in enumerate(pts)}
  keys = [i for i, (_, key) in enumerate(packets) if key]
  time_base = stream.time_base
  wanted = sorted(set(plan))
  first = {i: _keyframe_for(i, keys, pts) for i in wanted}
  got: dict[int, np.ndarray] = {}
  # The empty packet that drains the decoder, stamped with the stream's time base as the
  # demuxer's own are: frames drained by a bare decode(None) have no time base (time NaN).
  drain = av.Packet()
  drain.time_base = time_base
  demuxer, start, pos = None, 0, 0  # packets since the last seek, its keyframe, next index

  def take(frames) -> None:
    for frame in frames:
      i = index.get(frame.pts)
      # The float time the old decode compared: a frame must be at its packet's time.
      if i is None or frame.time != float(pts[i] * time_base):
        raise _Replan(f"a frame at pts {frame.pts}")
      # A chosen frame counts once it decodes from its own keyframe or before: one that
      # comes out of a run started later (an open GOP's leading frame) may be broken.
      if i in first and i not in got and start <= first[i]:
        got[i] = frame.to_ndarray(format="rgb24")

  try:
    for n, d in enumerate(wanted):
      k = first[d]
      if demuxer is None or k > pos or k < start:
        if any(i not in got for i in wanted[:n]):
          take(ctx.decode(drain))  # the frames still held for reordering; seek flushes
        if demuxer is not None:
          demuxer.close()
        container.seek(pts[k], stream=stream)
        demuxer = container.demux(stream)
        packet = next(demuxer, None)
        pos = index.get(packet.pts, -1) if packet is not None and packet.size else -1
        if not 0 <= pos <= k or not packets[pos][1]:
          raise _Replan(f"the seek to packet {k} landed at {pos}")
        start = pos
      else:
        packet = next(demuxer)
      while True:
        if not packet.size or packet.pts != pts[pos]:
          raise _Replan(f"packet {pos} is not the one the demux pass saw")
        if skips:
          ctx.skip_frame = "DEFAULT" if pos in first else "NONREF"
        take(ctx.decode(packet))
        pos += 1
        if pos > d:
          break
        packet = next(demuxer)
    if len(got) < len(wanted):
      take(ctx.decode(drain))
  except StopIteration as e:
    raise _Replan("the stream ended early") from e
  finally:
    if demuxer is not None:
      demuxer.close()
  if len(got) < len(wanted):
    raise _Replan("a chosen frame never came out")
  return got


def _keyframe_for(d: int, keys: list[int], pts: list[int]) -> int:
  """The packet to start decoding packet `d` from: the last keyframe at or before it whose
  time is not after its own, else the first packet (a keyframe: `_plan` checks)."""
  for k in reversed(keys[:bisect.bisect_right(keys, d)]):
    if pts[k] <= pts[d]:
      return k
  return 0


def _decode_forward(data: bytes | str, targets: list[float]) -> list[np.ndarray]:
  """uint8[H, W, 3] of the frame on screen at each target time (the last frame starting at
  or before it; the first frame for a time before any), decoding every frame from the
  start and stopping after the last one needed. The reference for `_decode_planned`."""
  out: list[np.ndarray] = []
  shown, rgb = None, None  # the frame on screen so far, and its pixels once converted
  with _open(data) as container:
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1  # see _decode_planned
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
                sample_rate: int = audio.SAMPLE_RATE, codec: str | None = None,
                gop: int | None = None) -> None:
  """Encodes uint8[N, H, W, 3] (H, W even) at `fps`, plus an optional mono float32 track.

  For tests, benchmarks and exports. Container by extension (.mp4, .webm, .avi) with the
  codecs of `_WRITERS`, or `codec` for the video; frame i starts at i / fps exactly. `gop`:
  the most frames from one keyframe to the next (N: one keyframe per clip); None keeps the
  encoder's default (libx264: 250).
  """
  import av

  ext = os.path.splitext(path)[1].lower()
  vcodec, acodec = _WRITERS[ext]
  with av.open(path, "w") as container:
    stream = container.add_stream(codec or vcodec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    # mjpeg wants full-range YUV; the others the usual limited-range 4:2:0.
    stream.pix_fmt = "yuvj420p" if (codec or vcodec) == "mjpeg" else "yuv420p"
    if gop is not None:
      stream.codec_context.gop_size = gop
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
