"""Host audio: Whisper log-mel parity with transformers, decoding, resampling, bad files."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import soundfile

from mm_jax.data import audio
from mm_jax.data.errors import CORRUPT_AUDIO, MISSING_AUDIO, BadRecord


def chirp_and_noise(seconds: float = 3.7, seed: int = 0) -> np.ndarray:
  """float32[N] at 16 kHz: a 200 Hz -> 7.6 kHz chirp plus white noise."""
  t = np.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
  noise = np.random.default_rng(seed).normal(size=t.shape)
  return (0.5 * np.sin(2 * np.pi * (200 * t + 1000 * t**2)) + 0.05 * noise).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
  transformers = pytest.importorskip("transformers")
  wav = chirp_and_noise()
  extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
  ref = extractor(wav, sampling_rate=16000, return_tensors="np")["input_features"][0]  # [M, L]
  ours = audio.log_mel(wav, n_mels, pad_to_seconds=30)
  assert ours.shape == (3000, n_mels) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref.T, rtol=0, atol=1e-4)
  # Unpadded: the clip's N // 160 frames, equal to the padded ones but for the last two
  # (whose windows reach past the clip: reflected clip here, zeros there).
  short = audio.log_mel(wav, n_mels)
  assert short.shape == (len(wav) // 160, n_mels)
  np.testing.assert_allclose(short[:-2], ours[:len(short) - 2], rtol=0, atol=1e-6)


def test_log_mel_of_a_clip_shorter_than_a_hop_is_empty():
  assert audio.log_mel(np.zeros(159, np.float32), 80).shape == (0, 80)


def test_wav_at_44k_loads_resampled_mono_with_the_tone_kept(tmp_path):
  sr, seconds, tone = 44100, 1.5, 1000.0
  t = np.arange(int(sr * seconds)) / sr
  left = 0.8 * np.sin(2 * np.pi * tone * t)
  path = tmp_path / "tone.wav"
  soundfile.write(path, np.stack([left, np.zeros_like(left)], axis=1), sr, subtype="PCM_16")
  x = audio.load_audio(path)
  assert x.dtype == np.float32 and x.ndim == 1
  assert len(x) == math.ceil(len(t) * 16000 / sr) == 24000
  spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  peak_hz = np.argmax(spectrum) * 16000 / len(x)
  assert abs(peak_hz - tone) <= 16000 / len(x)  # within one FFT bin
  mid = x[2000:-2000]  # away from the resampling filter's edges
  assert abs(np.abs(mid).max() - 0.4) < 0.01  # stereo averaged: (0.8 + 0) / 2


def test_flac_bytes_at_16k_load_unchanged(tmp_path):
  x = chirp_and_noise(0.5)
  path = tmp_path / "a.flac"
  soundfile.write(path, x, 16000, subtype="PCM_24")
  np.testing.assert_allclose(audio.load_audio(path.read_bytes(), record_id="r1"), x, atol=1e-6)


def test_m4a_decodes_through_pyav(tmp_path):
  av = pytest.importorskip("av", reason="PyAV is the decoder for formats libsndfile lacks")
  path, sr = tmp_path / "tone.m4a", 22050
  t = np.arange(sr) / sr
  samples = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
  with av.open(str(path), "w") as out:
    stream = out.add_stream("aac", rate=sr, layout="mono")
    frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
    frame.sample_rate = sr
    for packet in stream.encode(frame):
      out.mux(packet)
    for packet in stream.encode(None):
      out.mux(packet)
  x = audio.load_audio(path)
  assert abs(len(x) - 16000) <= 1600  # AAC adds priming / padding samples
  peak_hz = np.argmax(np.abs(np.fft.rfft(x))) * 16000 / len(x)
  assert abs(peak_hz - 440.0) <= 2 * 16000 / len(x)


def test_missing_and_corrupt_files_are_bad_records(tmp_path):
  missing = tmp_path / "nope.wav"
  with pytest.raises(BadRecord, match="nope.wav") as e:
    audio.load_audio(missing)
  assert e.value.reason == MISSING_AUDIO and e.value.record_id == str(missing)
  corrupt = tmp_path / "bad.wav"
  corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + bytes(range(200)))
  with pytest.raises(BadRecord, match="bad.wav") as e:
    audio.load_audio(corrupt, record_id="sample-7")
  assert e.value.reason == CORRUPT_AUDIO and e.value.record_id == "sample-7"


def test_without_soundfile_pyav_decodes_and_without_both_it_is_an_install_error(
    tmp_path, monkeypatch):
  pytest.importorskip("av", reason="PyAV is the fallback decoder")
  x = chirp_and_noise(0.5)
  path = tmp_path / "a.wav"
  soundfile.write(path, x, 16000, subtype="FLOAT")
  monkeypatch.setitem(sys.modules, "soundfile", None)  # `import soundfile` raises ImportError
  np.testing.assert_allclose(audio.load_audio(path), x, atol=1e-6)
  monkeypatch.setitem(sys.modules, "av", None)
  with pytest.raises(ImportError, match="soundfile .* or av"):  # not a skipped bad record
    audio.load_audio(path)
