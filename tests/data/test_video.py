"""video.load_video: which frames uniform and fps sampling pick, the audio track, errors,
and frames bit-identical to a plain decode of every frame however the loader decodes.

Clips are written here with PyAV: runs of solid colours, so a sampled frame's mean colour
says which second it came from despite lossy coding; and sliding noise per codec and
keyframe spacing, so that every frame differs from its neighbours.
"""

import numpy as np
import pytest
import soundfile

from mm_jax.data import audio, media, video
from mm_jax.data.errors import BadRecord

COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.uint8)
FPS = 10  # 4 colours x 1 s each: frame i has colour i // 10


def _clip(colours=COLOURS, per_colour=FPS, height=48, width=64) -> np.ndarray:
  return np.repeat(colours, per_colour, axis=0)[:, None, None, :] * np.ones(
    (1, height, width, 1), np.uint8)


def _tone(seconds: float, hz: float = 440.0) -> np.ndarray:
  t = np.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
  return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  """{".mp4" | ".webm" | ".avi": path}: 4 s of colours with a 440 Hz track; and a silent mp4."""
  root = tmp_path_factory.mktemp("video")
  paths = {}
  for ext in (".mp4", ".webm", ".avi"):
    paths[ext] = str(root / f"clip{ext}")
    video.write_video(paths[ext], _clip(), fps=FPS, waveform=_tone(4.0))
  paths["silent"] = str(root / "silent.mp4")
  video.write_video(paths["silent"], _clip(), fps=FPS)
  return paths


def _colours(frames: np.ndarray) -> list[int]:
  """Index into COLOURS of each frame's mean colour (within 12 levels of lossy coding)."""
  means = frames.reshape(len(frames), -1, 3).mean(axis=1)
  dist = np.abs(means[:, None, :] - COLOURS[None].astype(float)).max(axis=-1)
  assert dist.min(axis=1).max() < 12, means
  return dist.argmin(axis=1).tolist()


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".avi"])
def test_uniform_takes_the_middle_frame_of_each_part(clips, ext):
  frames, track = video.load_video(clips[ext], num_frames=4, size=16)
  assert frames.dtype == np.uint8 and frames.shape == (4, 16, 16, 3) and track is None
  assert _colours(frames) == [0, 1, 2, 3]
  frames, _ = video.load_video(clips[ext], num_frames=8, size=16)  # frames 2, 7, ..., 37
  assert _colours(frames) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_uniform_repeats_frames_of_a_short_clip(tmp_path):
  path = str(tmp_path / "three.mp4")
  video.write_video(path, _clip(per_colour=1)[:3], fps=FPS)
  frames, _ = video.load_video(path, num_frames=5, size=16)  # frames 0, 0, 1, 2, 2
  assert _colours(frames) == [0, 0, 1, 2, 2]


def test_fps_samples_by_time_then_thins_or_pads(clips):
  load = lambda fps, n: _colours(video.load_video(clips[".mp4"], num_frames=n, size=16,
                                                  sampling="fps", fps=fps)[0])
  assert load(1.0, 6) == [0, 1, 2, 3, 3, 3]  # t = 0, 1, 2, 3 s, last one repeated
  assert load(0.5, 4) == [0, 2, 2, 2]  # t = 0, 2 s
  assert load(2.0, 3) == [0, 2, 3]  # t = 0, 0.5, ..., 3.5 s thinned to 0.5, 2, 3 s


def test_frames_are_fitted_like_images(tmp_path):
  path = str(tmp_path / "wide.avi")
  video.write_video(path, _clip(height=16, width=64)[:2], fps=FPS)
  frames, _ = video.load_video(path, num_frames=1, size=32, aspect="pad", mean=(0.0, 0.5, 1.0))
  assert frames.shape == (1, 32, 32, 3)
  np.testing.assert_allclose(frames[0, 0].mean(axis=0), (0, 127, 255), atol=2)  # the padding
  np.testing.assert_allclose(frames[0, 16].mean(axis=0), COLOURS[0], atol=12)  # the picture


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".avi"])
def test_audio_track_is_16khz_mono(clips, ext):
  with open(clips[ext], "rb") as f:
    frames, track = video.load_video(f.read(), num_frames=2, size=8, with_audio=True)
  assert track.dtype == np.float32 and abs(len(track) - 4 * audio.SAMPLE_RATE) < 1600
  spectrum = np.abs(np.fft.rfft(track[4000:20000]))
  assert np.argmax(spectrum) * audio.SAMPLE_RATE / 16000 == pytest.approx(440, abs=2)
  assert _colours(frames) == [1, 3]  # frames 10 and 30


def _reason(data, **kwargs) -> tuple[str, str]:
  with pytest.raises(BadRecord) as e:
    video.load_video(data, num_frames=2, size=8, record_id="r", **kwargs)
  assert e.value.record_id == "r"
  return e.value.reason, e.value.detail


def test_errors_are_bad_records(clips, tmp_path):
  assert _reason(str(tmp_path / "nope.mp4")) == ("missing_video",
                                                 f"{tmp_path / 'nope.mp4'}: no such file")
  reason, detail = _reason(b"not a video at all" * 50)
  assert reason == "corrupt_video" and detail.startswith("<bytes>: ")
  with open(clips[".mp4"], "rb") as f:
    assert _reason(f.read()[:300])[0] == "corrupt_video"  # truncated before any frame
  soundfile.write(tmp_path / "sound.wav", _tone(0.5), audio.SAMPLE_RATE)
  assert _reason(str(tmp_path / "sound.wav")) == ("corrupt_video",
                                                  f"{tmp_path / 'sound.wav'}: no video stream")
  reason, detail = _reason(clips["silent"], with_audio=True)
  assert reason == "corrupt_video" and "no audio track" in detail
  with pytest.raises(ValueError, match="sampling"):
    video.load_video(clips[".mp4"], num_frames=2, size=8, sampling="random")


# Frames identical to a decode of every frame: moving noise, so every frame differs and a
# wrong pick shows; H.264 / MPEG-2 / MPEG-4 with B-frames reorder frames and skip the ones
# nothing predicts from; HEVC and those MPEG-4 B-frames have open GOPs (frames shown before
# their keyframe that predict from the previous one).
DECODES = [("h264_gop_1s", "libx264", ".mp4", 10), ("h264_one_key", "libx264", ".mp4", 30),
           ("mpeg2_gop_1s", "mpeg2video", ".mp4", 10), ("hevc_gop_1s", "libx265", ".mp4", 10),
           ("mpeg4_gop_1s", None, ".mp4", 10), ("mpeg4_bframes", "mpeg4", ".mp4", 10),
           ("vp8_gop_1s", None, ".webm", 10), ("mjpeg", None, ".avi", None),
           ("h264_short", "libx264", ".mp4", 10)]
SAMPLES = [dict(num_frames=8), dict(num_frames=40), dict(num_frames=8, aspect="pad"),
           dict(num_frames=5, sampling="fps", fps=1.0),
           dict(num_frames=4, sampling="fps", fps=3.0, aspect="pad")]


@pytest.fixture(scope="module")
def noise_clips(tmp_path_factory):
  """{name: path} of DECODES: 3 s at 10 fps of 96x64 noise sliding by a pixel a frame."""
  av = pytest.importorskip("av")
  root = tmp_path_factory.mktemp("noise")
  base = np.random.default_rng(0).integers(0, 255, (64, 128, 3), np.uint8)
  frames = np.stack([base[:, i:i + 96] for i in range(30)])
  paths = {}
  for name, codec, ext, gop in DECODES:
    try:
      av.codec.Codec(codec or "mpeg4", "w")
    except av.codec.codec.UnknownCodecError:
      continue  # an encoder this PyAV build lacks (libx265 is optional)
    paths[name] = str(root / f"{name}{ext}")
    if name == "mpeg4_bframes":
      _write_bframes(paths[name], frames, gop)
    else:
      video.write_video(paths[name], frames[:3] if name.endswith("short") else frames,
                        fps=FPS, codec=codec, gop=gop)
  return paths


def _write_bframes(path: str, frames: np.ndarray, gop: int) -> None:
  """MPEG-4 part 2 with 2 B-frames between references (write_video's mpeg4 has none)."""
  import av

  with av.open(path, "w") as container:
    stream = container.add_stream("mpeg4", rate=FPS)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size, stream.codec_context.max_b_frames = gop, 2
    for i, pixels in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
      frame.pts = i
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


def _reference(path: str, *, num_frames: int, sampling: str = "uniform", fps: float = 1.0,
               aspect: str = "resize") -> np.ndarray:
  """uint8[F, 24, 24, 3] the plain way: decode every frame forward, pick by the module
  docstring's rules (by decoded frame times), convert as load_video always has (rgb24, fit)."""
  import av

  with av.open(path) as container:
    decoded = list(container.decode(video=0))
  times = [f.time for f in decoded]
  n = len(times)
  if sampling == "uniform":
    targets = [times[(2 * k + 1) * n // (2 * num_frames)] for k in range(num_frames)]
  else:
    steps = int(np.floor((times[-1] - times[0]) * fps + 1e-6)) + 1
    grid = [times[0] + j / fps for j in range(steps)]
    if steps > num_frames:
      grid = [grid[(2 * k + 1) * steps // (2 * num_frames)] for k in range(num_frames)]
    targets = grid + [grid[-1]] * (num_frames - len(grid))
  # On screen at t: the last frame starting at or before it (the first frame before any).
  picks = [max([i for i, s in enumerate(times) if not t < s - 1e-6], default=0)
           for t in targets]
  return np.stack([media.fit(decoded[i].to_ndarray(format="rgb24"), size=24, aspect=aspect,
                             mean=(0.2, 0.5, 0.7)) for i in picks])


def _keyframes(path: str) -> list[int]:
  import av

  with av.open(path) as container:
    return [i for i, p in enumerate(container.demux(video=0)) if p.size and p.is_keyframe]


def test_write_video_places_keyframes_every_gop(noise_clips):
  assert _keyframes(noise_clips["h264_gop_1s"]) == [0, 10, 20]
  assert _keyframes(noise_clips["h264_one_key"]) == [0]


@pytest.mark.parametrize("name", [d[0] for d in DECODES])
def test_frames_equal_a_decode_of_every_frame(noise_clips, name, monkeypatch):
  if name not in noise_clips:
    pytest.skip(f"no encoder for {name}")

  def forward(*args):
    raise AssertionError("fell back to _decode_forward")

  # The planned decode itself must serve these ordinary clips, not its fallback.
  monkeypatch.setattr(video, "_decode_forward", forward)
  for kwargs in SAMPLES:
    frames, _ = video.load_video(noise_clips[name], size=24, mean=(0.2, 0.5, 0.7), **kwargs)
    np.testing.assert_array_equal(frames, _reference(noise_clips[name], **kwargs),
                                  err_msg=str(kwargs))


def test_fallback_decode_gives_the_same_frames(noise_clips, monkeypatch):
  def planned(*args):
    raise video._Replan("as if the stream broke the plan")

  monkeypatch.setattr(video, "_decode_planned", planned)
  for kwargs in SAMPLES[:2]:
    frames, _ = video.load_video(noise_clips["h264_gop_1s"], size=24, mean=(0.2, 0.5, 0.7),
                                 **kwargs)
    np.testing.assert_array_equal(frames, _reference(noise_clips["h264_gop_1s"], **kwargs))


def test_decoding_starts_at_a_keyframe_shown_no_later_than_the_frame():
  # Decode order with presentation times: keyframes at 0 (t 0) and 3 (t 40); packets 4, 5
  # are shown before keyframe 3 (open GOP), so they decode from keyframe 0.
  keys, pts = [0, 3], [0, 20, 10, 40, 30, 35, 60, 50]
  assert [video._keyframe_for(d, keys, pts) for d in range(8)] == [0, 0, 0, 3, 0, 0, 3, 3]


class _Seeks:
  """A container that records where it seeks, otherwise the real one."""

  def __init__(self, container, log: list[int]):
    self._container, self._log = container, log

  def __enter__(self):
    self._container.__enter__()
    return self

  def __exit__(self, *exc):
    return self._container.__exit__(*exc)

  def __getattr__(self, name):
    return getattr(self._container, name)

  def seek(self, offset, **kwargs):
    self._log.append(offset)
    return self._container.seek(offset, **kwargs)


@pytest.mark.parametrize("name, runs", [("h264_gop_1s", [0, 10, 20]), ("h264_one_key", [0])])
def test_seeks_only_to_keyframes_past_the_decoder(noise_clips, name, runs, monkeypatch):
  """Uniform 3 of 30 frames are frames 5, 15, 25, one per second: a run from each keyframe
  before them (0, 10, 20) once it lies ahead of the decoder, or one run from the start for
  a clip with a single keyframe."""
  import av

  log: list[int] = []
  opened = video._open
  monkeypatch.setattr(video, "_open", lambda data: _Seeks(opened(data), log))
  video.load_video(noise_clips[name], num_frames=3, size=8)
  with av.open(noise_clips[name]) as container:
    pts = [p.pts for p in container.demux(video=0) if p.size]
  assert log == [pts[i] for i in runs]
