"""Generation-based evaluation: greedy answers scored VQA-style against the references.

Scoring follows the VQA evaluation's answer normalisation (lower case, punctuation and
articles dropped, whitespace collapsed), then exact match with the single reference
answer each of our records carries.
"""

from __future__ import annotations

import re
import string

import numpy as np

from mm_jax.infer.generate import Generator, left_pad

MEDIA_KEYS = ("images", "image_valid", "video", "video_valid", "audio", "audio_valid",
              "audio_frames")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(answer: str) -> str:
  answer = _PUNCT.sub(" ", answer.lower())
  return " ".join(_ARTICLES.sub(" ", answer).split())


def split_rows(batch: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Unpacked eval rows -> (prompt ids, reference answer ids incl. the end token) per row.

  `loss_mask[i]` marks `targets[i] = tokens[i + 1]` as an answer token, so the prompt is
  tokens[: first + 1]. Rows without any loss token (batch padding) are dropped.
  """
  prompts, answers = [], []
  for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"],
                                   strict=True):
    if mask.any():
      first = int(np.argmax(mask))
      prompts.append(tokens[:first + 1])
      answers.append(targets[mask])
  return prompts, answers


def score_batch(gen: Generator, batch: dict[str, np.ndarray], decode) -> tuple[int, int]:
  """(VQA-correct answers, answers) for one unpacked eval batch; `decode`: ids -> text."""
  prompts, answers = split_rows(batch)
  if not prompts:
    return 0, 0
  keep = batch["loss_mask"].any(axis=1)
  inputs = left_pad(prompts, gen.settings.pad_id)
  for key in MEDIA_KEYS:  # [B*M, ...] media of the rows kept, M slots per row
    if key in batch:
      per_row = batch[key].shape[0] // batch["tokens"].shape[0]
      inputs[key] = batch[key][np.repeat(keep, per_row)]
  stops = set(gen.settings.stop_ids)
  correct = 0
  for got, want in zip(gen(inputs), answers, strict=True):
    strip = lambda ids: [int(i) for i in ids if int(i) not in stops]
    correct += normalise(decode(strip(got))) == normalise(decode(strip(want)))
  return correct, len(answers)
