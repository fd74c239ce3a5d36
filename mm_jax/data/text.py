"""Tokenisation and prompt templates.

`WordTokenizer` is the closed-vocabulary tokenizer of the embedded synthetic data set
(SentencePiece / tokenizer.json wrappers come with real data, issue 4). A template turns
(prompt words, answer words) into token ids plus a loss mask that is true only on the
answer (or caption) and its end-of-sequence token.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_TAG = "<image>"


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
  """Whitespace tokenizer over a fixed word list; ids 0-3 are pad, bos, eos, unk."""

  words: tuple[str, ...]
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  unk_id: int = 3

  @property
  def vocab(self) -> tuple[str, ...]:
    return ("<pad>", "<bos>", "<eos>", "<unk>") + self.words

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, words: list[str]) -> list[int]:
    index = {w: i for i, w in enumerate(self.vocab)}
    return [index.get(w, self.unk_id) for w in words]

  def decode(self, ids) -> str:
    vocab = self.vocab
    return " ".join(vocab[i] for i in ids if 0 <= i < len(vocab) and i > self.eos_id)


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One sample's text, before padding: int32[L] tokens and bool[L] answer mask."""

  tokens: np.ndarray
  answer: np.ndarray


def render(tokenizer: WordTokenizer, prompt: list[str], answer: list[str], *,
           image_token_id: int, tokens_per_image: int) -> Encoded:
  """`<bos> prompt answer <eos>` with each `<image>` word expanded to its placeholders.

  The loss counts on the answer words and the final <eos> only (LLaVA masks the prompt).
  """
  ids, mask = [tokenizer.bos_id], [False]
  for word in prompt:
    if word == IMAGE_TAG:
      ids += [image_token_id] * tokens_per_image
      mask += [False] * tokens_per_image
    else:
      ids += tokenizer.encode([word])
      mask.append(False)
  ids += tokenizer.encode(answer) + [tokenizer.eos_id]
  mask += [True] * (len(answer) + 1)
  return Encoded(np.asarray(ids, np.int32), np.asarray(mask, bool))
