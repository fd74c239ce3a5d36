"""video.load_video: which frames uniform and fps sampling pick, the audio track, and errors.

Clips are written here with PyAV: runs of solid colours, so a sampled frame's mean colour
says which second it came from despite lossy coding.
"""

import numpy as np
import pytest
import soundfile

from mm_jax.data import audio, video
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
