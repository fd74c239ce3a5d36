"""Generation-based evaluation: greedy answers scored VQA-style against the references.

Scoring follows the VQA evaluation's answer normalisation (lower case, punctuation and
articles dropped, whitespace collapsed), then exact match with the single reference
answer each of our records carries.
"""

from __future__ import annotations

import re
import string

import numpy as np
from jax.experimental import multihost_utils

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
  return count_correct(gen(inputs), answers, gen.settings.stop_ids, decode), len(answers)


def score_every_row(gen: Generator, batch: dict[str, np.ndarray], decode) -> tuple[int, int]:
  """score_batch for a Generator over a multi-process mesh: `batch` is this process's rows.

  The decode is one collective, so no row is dropped and every process pads its prompts to
  the widest of any process's: a row without a loss token (batch padding) decodes a one-token
  prompt, its media marked invalid (its placeholders are gone), and is not scored.
  """
  prompts, answers = split_rows(batch)
  keep = batch["loss_mask"].any(axis=1)
  pad = gen.settings.pad_id
  rest = iter(prompts)
  rows = [next(rest) if k else np.full(1, pad, np.int32) for k in keep]
  width = multihost_utils.process_allgather(np.int32(max(len(r) for r in rows))).max()
  inputs = left_pad(rows, pad, width=int(width))
  for key in MEDIA_KEYS:  # [B*M, ...] media, M slots per row
    if key in batch:
      inputs[key] = batch[key]
      if key.endswith("_valid"):
        inputs[key] = batch[key] & np.repeat(keep, batch[key].shape[0] // len(keep))
  got = [ids for ids, k in zip(gen(inputs), keep, strict=True) if k]
  return count_correct(got, answers, gen.settings.stop_ids, decode), len(answers)


def count_correct(got: list[list[int]], answers: list[np.ndarray], stop_ids, decode) -> int:
  """How many generated answers equal their reference, VQA-normalised, stop ids dropped."""
  strip = lambda ids: [int(i) for i in ids if int(i) not in stop_ids]
  return sum(normalise(decode(strip(g))) == normalise(decode(strip(w)))
             for g, w in zip(got, answers, strict=True))
