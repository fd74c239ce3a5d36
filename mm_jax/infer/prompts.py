"""User text + image files -> a generation batch, with the run's tokenizer and template.

The prompt is exactly the prefix a training sample has before its answer: the template is
rendered with a stand-in answer and cut where the answer's loss mask starts, so the model
sees at generation time what it saw in training (`<bos>`, system text, `ASSISTANT:`...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from mm_jax.config import Config
from mm_jax.data import media, pipeline, templates
from mm_jax.data.text import IMAGE_TAG, Encoded, WordTokenizer, render


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


def _with_tags(text: str, n_images: int) -> str:
  """Puts one `<image>` line per image in front when the text names none (LLaVA's habit)."""
  tags = text.count(IMAGE_TAG)
  if tags == 0:
    return f"{IMAGE_TAG}\n" * n_images + text
  if tags != n_images:
    raise PromptError(f"the prompt has {tags} {IMAGE_TAG} tags but {n_images} images were given")
  return text


def _words(tok: WordTokenizer, text: str) -> list[str]:
  """Synthetic vocabulary words of `text`: lower case, '?' split off; unknown words refused."""
  words = [w for piece in text.replace("\n", " ").split() for w in
           ([piece] if piece == IMAGE_TAG else re.findall(r"[\w']+|\?", piece.lower()))]
  unknown = sorted({w for w in words if w != IMAGE_TAG and w not in tok.vocab})
  if unknown:
    raise PromptError(f"words {unknown} are not in the synthetic vocabulary "
                     f"{sorted(tok.words)}")
  return words


def _render(cfg: Config, tok, text: str) -> Encoded:
  """`text` as the human turn of a sample whose answer is a stand-in."""
  per_image = cfg.model.vision.tokens_per_image
  if isinstance(tok, WordTokenizer):
    return render(tok, _words(tok, text), ["?"], image_token_id=cfg.model.image_token_id,
                  tokens_per_image=per_image)
  return templates.render_conversation(tok, [("human", text), ("gpt", "x")], cfg.data.template,
                                       expand={cfg.model.image_token_id: per_image})


def encode(cfg: Config, tok, text: str, n_images: int) -> np.ndarray:
  """Prompt ids int32[L]: the rendered sample up to (not including) its answer."""
  enc = _render(cfg, tok, _with_tags(text, n_images))
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
