"""User text + image files -> a generation batch, with the run's tokenizer and template.

The prompt is exactly the prefix a training sample has before its answer: the template is
rendered with a stand-in answer and cut where the answer's loss mask starts, so the model
sees at generation time what it saw in training (`<bos>`, system text, `ASSISTANT:`...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from mm_jax.config import Config
from mm_jax.data import audio, media, pipeline, templates, video
from mm_jax.data.text import AUDIO_TAG, IMAGE_TAG, VIDEO_TAG, Encoded, WordTokenizer, render


class PromptError(ValueError):
  """A prompt the run's tokenizer or image count cannot serve (message says why)."""


def tokenizer_for(cfg: Config):
  """The run's tokenizer: the synthetic word list, or data.tokenizer with its media tags."""
  if cfg.data.source == "synthetic":
    return pipeline.synthetic_tokenizer()
  if cfg.data.source == "synthetic_av":
    return pipeline.av_tokenizer()
  from mm_jax.data import llava

  return llava.tokenizer_for(cfg.data, cfg.model)


TAGS = {"image": IMAGE_TAG, "video": VIDEO_TAG, "audio": AUDIO_TAG}


def _with_tags(text: str, counts: Mapping[str, int]) -> str:
  """Puts one tag line per media item in front (images, then videos, then audio) for each
  modality the text names no tag of (LLaVA's habit); otherwise tag and item counts must
  agree."""
  prefix = ""
  for m, tag in TAGS.items():
    n, found = counts.get(m, 0), text.count(tag)
    if found == 0:
      prefix += f"{tag}\n" * n
    elif found != n:
      raise PromptError(f"the prompt has {found} {tag} tags but {n} {m} item(s) were given")
  return prefix + text


def _words(tok: WordTokenizer, text: str) -> list[str]:
  """Synthetic vocabulary words of `text`: lower case, '?' split off; unknown words refused."""
  tags = set(TAGS.values())
  words = [w for piece in text.replace("\n", " ").split() for w in
           ([piece] if piece in tags else re.findall(r"[\w']+|\?", piece.lower()))]
  unknown = sorted({w for w in words if w not in tags and w not in tok.vocab})
  if unknown:
    raise PromptError(f"words {unknown} are not in the synthetic vocabulary "
                      f"{sorted(tok.words)}")
  return words


def _render(cfg: Config, tok, text: str, audio_tokens: Sequence[int] = ()) -> Encoded:
  """`text` as the human turn of a sample whose answer is a stand-in."""
  m = cfg.model
  counts = {"image": m.vision.tokens_per_image, "video": m.video.tokens_per_video(m.vision),
            "audio": list(audio_tokens)}
  if isinstance(tok, WordTokenizer):
    tags = {TAGS[k]: (m.token_id(k), n) for k, n in counts.items()}
    words = _words(tok, text)
    if cfg.data.source == "synthetic_av":  # the same placeholder order as in training
      spec = pipeline.RowSpec.create(cfg.data, m)
      words, av = pipeline.av_tags(words, spec, list(audio_tokens),
                                   interleave=cfg.data.interleave_av)
      tags.update(av)
    return render(tok, words, ["?"], tags=tags)
  expand = {m.token_id(k): n for k, n in counts.items() if k in m.modalities}
  return templates.render_conversation(tok, [("human", text), ("gpt", "x")], cfg.data.template,
                                       expand=expand)


def encode(cfg: Config, tok, text: str, n_images: int = 0, *, n_videos: int = 0,
           audio_tokens: Sequence[int] = ()) -> np.ndarray:
  """Prompt ids int32[L]: the rendered sample up to (not including) its answer.

  audio_tokens: placeholders of each audio clip, in order (they follow the clips' lengths).
  """
  counts = {"image": n_images, "video": n_videos, "audio": len(audio_tokens)}
  for k, n in counts.items():
    if n and k not in cfg.model.modalities:
      raise PromptError(f"{n} {k} item(s) given but the model reads no {k} "
                        f"(config.model.modalities={cfg.model.modalities})")
  enc = _render(cfg, tok, _with_tags(text, counts), audio_tokens)
  return enc.tokens[:int(np.argmax(enc.answer))]


def stop_ids(cfg: Config, tok) -> tuple[int, ...]:
  """The template's end-of-answer token, the tokenizer's eos and config.generate.stop."""
  end = int(_render(cfg, tok, "?").tokens[-1])
  eos = () if tok.eos_id is None else (int(tok.eos_id),)
  return tuple(sorted({end, *eos, *cfg.generate.stop}))


def load_images(cfg: Config, paths: Sequence[str]) -> np.ndarray:
  """Image files -> float32[max(n, 1), S, S, 3], preprocessed as the data pipeline does."""
  v = cfg.model.vision
  out = np.zeros((max(len(paths), 1), v.image_size, v.image_size, 3), np.float32)
  for i, path in enumerate(paths):
    out[i] = media.preprocess(media.decode_image(path, record_id=path), size=v.image_size,
                              aspect=cfg.data.image_aspect_ratio, mean=v.mean, std=v.std)
  return out


def load_videos(cfg: Config, paths: Sequence[str]) -> np.ndarray:
  """Video files -> float32[max(n, 1), F, S, S, 3], sampled and normalised as in training."""
  v = cfg.model.vision
  out = np.zeros((max(len(paths), 1), cfg.model.video.num_frames, v.image_size, v.image_size,
                  3), np.float32)
  for i, path in enumerate(paths):
    frames, _ = video.load_video(path, num_frames=cfg.model.video.num_frames,
                                 size=v.image_size, record_id=path,
                                 aspect=cfg.data.image_aspect_ratio, mean=v.mean)
    out[i] = media.normalise(frames, v.mean, v.std)
  return out


def load_audio(cfg: Config, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Audio files -> (log-mel float32[max(n, 1), L, n_mels], frames int32[max(n, 1)])."""
  a, length = cfg.model.audio, cfg.data.audio_seq_len
  mels = [audio.log_mel(audio.load_audio(p, record_id=p)[:length * audio.HOP], n_mels=a.n_mels)
          for p in paths]
  out = np.zeros((max(len(paths), 1), length, a.n_mels), np.float32)
  frames = np.zeros(len(out), np.int32)
  for i, mel in enumerate(mels):
    out[i, :len(mel)], frames[i] = mel, len(mel)
  return out, frames
