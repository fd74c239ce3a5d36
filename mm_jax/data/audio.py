"""Audio decoding and Whisper log-mel features on the host, with numpy (no JAX, no torch).

`load_audio` turns a file (wav/flac/ogg through libsndfile, anything else through PyAV's
FFmpeg when `av` is installed) into mono float32 samples at 16 kHz; failures raise
`BadRecord`. `log_mel` turns samples into the audio tower's input float32[L, n_mels]
(time-major), the numbers of transformers' `WhisperFeatureExtractor`: 25 ms periodic Hann
windows (n_fft 400) every 10 ms (hop 160), power spectrum, slaney mel bank 0-8 kHz,
log10 floored at 1e-10, clamped to (max - 8), then (x + 4) / 4.
"""

from __future__ import annotations

import functools
import io
import math
import os

import numpy as np
import scipy.signal

from mm_jax.data.errors import CORRUPT_AUDIO, MISSING_AUDIO, BadRecord

SAMPLE_RATE = 16000
N_FFT, HOP = 400, 160  # 25 ms windows, 100 frames per second
_LOG_FLOOR, _DYNAMIC_RANGE = 1e-10, 8.0  # log10 floor; keep 8 decades (80 dB) below the max


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
  """Slaney's mel scale (as librosa's htk=False): linear below 1 kHz, log above."""
  f = np.asarray(f, np.float64)
  log_step = math.log(6.4) / 27.0
  return np.where(f < 1000.0, 3.0 * f / 200.0,
                  15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) / log_step)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
  log_step = math.log(6.4) / 27.0
  return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(log_step * (m - 15.0)))


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> np.ndarray:
  """float64[N_FFT // 2 + 1, n_mels]: triangular filters evenly spaced on the slaney mel
  scale over 0-8 kHz, each scaled by 2 / bandwidth (slaney area normalisation)."""
  fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
  edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2))
  lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (fft_hz[:, None] - lower) / (centre - lower)
  falling = (upper - fft_hz[:, None]) / (upper - centre)
  bank = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
  bank.setflags(write=False)  # shared by the cache
  return bank


def log_mel(waveform: np.ndarray, n_mels: int = 80,
            pad_to_seconds: float | None = None) -> np.ndarray:
  """float32[N] at 16 kHz -> log-mel float32[L, n_mels], L = N' // 160 (100 frames a second).

  pad_to_seconds=None: N' = N, the clip's own frames (short clips stay short) and the clamp
  uses the clip's own max. pad_to_seconds=30: WhisperFeatureExtractor exactly: zeros are
  appended (or the clip cut) to N' = 480000 samples, so L = 3000, and the (max - 8) clamp
  runs over all 3000 frames (the extractor's max is over the padded array). The two modes
  agree except within 2 frames of the clip's end (windows reaching past it see zeros
  rather than the reflected clip) and where the clamp bites.
  """
  x = np.asarray(waveform, np.float32).reshape(-1)
  if pad_to_seconds is not None:
    n = int(round(pad_to_seconds * SAMPLE_RATE))
    x = np.pad(x[:n], (0, max(0, n - x.shape[0])))
  frames = x.shape[0] // HOP
  if frames == 0:
    return np.zeros((0, n_mels), np.float32)
  # Centred STFT with reflect padding (torch.stft's default); its last frame is dropped.
  padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
  windows = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:frames]
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic
  power = np.abs(np.fft.rfft(windows * hann, axis=-1)) ** 2
  logs = np.log10(np.maximum(power @ mel_filters(n_mels), _LOG_FLOOR))
  logs = np.maximum(logs, logs.max() - _DYNAMIC_RANGE)
  return ((logs + 4.0) / 4.0).astype(np.float32)


def load_audio(data: bytes | str | os.PathLike, target_sr: int = SAMPLE_RATE, *,
               record_id: str | None = None) -> np.ndarray:
  """File bytes or a path -> mono float32[N] at `target_sr` (channels averaged).

  Decodes with soundfile (libsndfile: wav, flac, ogg, ...), else with PyAV (FFmpeg: mp3,
  m4a, mp4 audio tracks, ...) when `av` is installed; resamples with a polyphase filter
  (scipy.signal.resample_poly), so N = ceil(N_in * target_sr / sr). Raises
  BadRecord("missing_audio") for a path that does not exist and BadRecord("corrupt_audio")
  for anything that does not decode to at least one sample. `record_id` defaults to the path.
  """
  where = "<bytes>" if isinstance(data, bytes) else os.fspath(data)
  record_id = where if record_id is None else record_id
  if not isinstance(data, bytes) and not os.path.isfile(where):
    raise BadRecord(MISSING_AUDIO, record_id, f"{where}: no such file")
  try:
    samples, sr = _decode(data)
  except ImportError:  # an install problem, not a bad record: fail once, loudly
    raise
  except Exception as e:  # both decoders raise many exception types on malformed input
    raise BadRecord(CORRUPT_AUDIO, record_id, f"{where}: {type(e).__name__}: {e}") from e
  if samples.size == 0:
    raise BadRecord(CORRUPT_AUDIO, record_id, f"{where}: no audio samples")
  return resample(samples, sr, target_sr)


def resample(samples: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
  """float32[N] at `sr` -> float32[ceil(N * target_sr / sr)] at `target_sr`."""
  if sr == target_sr:
    return samples.astype(np.float32)
  g = math.gcd(int(sr), int(target_sr))
  return scipy.signal.resample_poly(samples, target_sr // g, sr // g).astype(np.float32)


def _decode(data: bytes | str) -> tuple[np.ndarray, int]:
  """Mono float32[N] and its sample rate; soundfile first, PyAV as the fallback.

  Raises ImportError (not a bad record) when neither decoder imports."""
  try:
    import soundfile  # here, as video's av: runs without audio files never need libsndfile
  except (ImportError, OSError):  # OSError: the wheel's libsndfile did not load
    return _decode_av(data)  # FFmpeg reads wav and flac too
  try:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    samples, sr = soundfile.read(source, dtype="float32", always_2d=True)  # [N, channels]
    return samples.mean(axis=1), int(sr)
  except Exception as sf_error:
    try:
      import av  # noqa: F401 (optional: FFmpeg for formats libsndfile lacks)
    except ImportError:
      raise sf_error from None
    return _decode_av(data)


def _decode_av(data: bytes | str) -> tuple[np.ndarray, int]:
  try:
    import av
  except ImportError as e:
    raise ImportError("decoding audio needs soundfile (libsndfile) or av (PyAV); "
                      "neither imports") from e

  source = io.BytesIO(data) if isinstance(data, bytes) else data
  with av.open(source) as container:
    if not container.streams.audio:
      raise ValueError("no audio stream")
    stream = container.streams.audio[0]
    # Planar float keeps the input's layout and rate: rows are channels.
    to_float = av.AudioResampler(format="fltp")
    chunks, sr = [], stream.rate
    for frame in container.decode(stream):
      for out in to_float.resample(frame):
        chunks.append(out.to_ndarray().mean(axis=0))
        sr = out.sample_rate
    for out in to_float.resample(None):  # flush
      chunks.append(out.to_ndarray().mean(axis=0))
  if not chunks or not sr:
    raise ValueError("no decodable audio frames")
  return np.concatenate(chunks).astype(np.float32), int(sr)
