"""Tokenisation and prompt templates.

`WordTokenizer` is the closed-vocabulary tokenizer of the embedded synthetic data set;
`load_tokenizer` wraps a real one (a SentencePiece `.model` or a Hugging Face
`tokenizer.json`) as a `TextTokenizer`. Placeholder tags (`<image>`, ...) are always split
out of the text before the model's tokenizer sees it, so a tag is one id and never a run of
sub-word pieces. Chat templates live in `templates.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

IMAGE_TAG = "<image>"
VIDEO_TAG, AUDIO_TAG = "<video>", "<audio>"


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
  """Whitespace tokenizer over a fixed word list; ids 0-3 are pad, bos, eos, unk.

  `tags` (none by default) get ids after the words, so templates.render_conversation works
  on it too.
  """

  words: tuple[str, ...]
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  unk_id: int = 3
  tags: tuple[str, ...] = ()
  prefix_space = True  # spaces never matter to a whitespace tokenizer

  @property
  def vocab(self) -> tuple[str, ...]:
    return ("<pad>", "<bos>", "<eos>", "<unk>") + self.words + self.tags

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, words: list[str] | str) -> list[int]:
    """A word list, or a text that is split on tags and then on whitespace."""
    if isinstance(words, str):
      words = [w for piece in split_tags(words, self.tags)
               for w in ([piece] if piece in self.tags else piece.split())]
    index = {w: i for i, w in enumerate(self.vocab)}
    return [index.get(w, self.unk_id) for w in words]

  def decode(self, ids) -> str:
    vocab = self.vocab
    return " ".join(vocab[i] for i in ids if 0 <= i < len(vocab) and i > self.eos_id)

  def tag_id(self, tag: str) -> int:
    if tag not in self.tags:
      raise ValueError(f"{tag!r} is not one of this tokenizer's tags {self.tags}")
    return self.vocab.index(tag)

  def special_id(self, token: str) -> int:
    if token not in self.vocab:
      raise ValueError(f"the tokenizer has no {token!r} token")
    return self.vocab.index(token)


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One sample's text, before padding: int32[L] tokens and bool[L] answer mask."""

  tokens: np.ndarray
  answer: np.ndarray


def render(tokenizer: WordTokenizer, prompt: list[str], answer: list[str], *,
           image_token_id: int = -1, tokens_per_image: int = 0,
           tags: Mapping[str, tuple[int, int | Sequence[int]]] | None = None,
           turns: Sequence[tuple[Sequence[str], Sequence[str]]] = ()) -> Encoded:
  """`<bos> prompt answer <eos>` with each tag word expanded to its placeholders, then
  `question answer <eos>` for each further (question, answer) of `turns`.

  tags: tag word -> (placeholder id, count or one count per occurrence), e.g.
  {"<video>": (49, 64), "<audio>": (50, [25, 12])}; by default only
  `<image>` -> (image_token_id, tokens_per_image). The loss counts on the answer words and
  their <eos> only (LLaVA masks the prompt and the human turns).
  """
  tags = {IMAGE_TAG: (image_token_id, tokens_per_image)} if tags is None else tags
  seen = dict.fromkeys(tags, 0)
  ids, mask = [tokenizer.bos_id], [False]
  for word in prompt:
    if word in tags:
      token_id, count = tags[word]
      if not isinstance(count, int):  # one count per occurrence (audio clips differ)
        count = count[seen[word]]
      seen[word] += 1
      ids += [token_id] * count
      mask += [False] * count
    else:
      ids += tokenizer.encode([word])
      mask.append(False)
  ids += tokenizer.encode(answer) + [tokenizer.eos_id]
  mask += [True] * (len(answer) + 1)
  for question, reply in turns:
    ids += tokenizer.encode(question) + tokenizer.encode(reply) + [tokenizer.eos_id]
    mask += [False] * len(question) + [True] * (len(reply) + 1)
  return Encoded(np.asarray(ids, np.int32), np.asarray(mask, bool))


# ------------------------------------------------------------------------------ tokenizers


class Tokenizer(Protocol):
  """What the templates need; `TextTokenizer` and `WordTokenizer` both provide it.

  tags: the placeholder tags that `encode` keeps whole. prefix_space: whether `encode`
  starts every text with a word boundary of its own (SentencePiece's dummy prefix).
  """

  tags: tuple[str, ...]
  prefix_space: bool

  @property
  def bos_id(self) -> int | None: ...
  @property
  def eos_id(self) -> int | None: ...
  @property
  def pad_id(self) -> int: ...
  @property
  def vocab_size(self) -> int: ...
  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids) -> str: ...
  def tag_id(self, tag: str) -> int: ...
  def special_id(self, token: str) -> int: ...


@functools.lru_cache(maxsize=64)
def _tag_pattern(tags: tuple[str, ...]) -> re.Pattern:
  # Longest first, so a tag that is a prefix of a longer one never cuts it; the group keeps
  # the tags in the split.
  alternatives = "|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True))
  return re.compile(f"({alternatives})")


def split_tags(text: str, tags: Sequence[str]) -> list[str]:
  """Text -> its pieces in order, each tag a piece of its own; empty pieces dropped.

  split_tags("a <image>b", ["<image>"]) == ["a ", "<image>", "b"].
  """
  if not tags:
    return [text] if text else []
  return [p for p in _tag_pattern(tuple(tags)).split(text) if p]


def _real(i: int) -> int | None:
  return i if i >= 0 else None  # SentencePiece says -1 for "no such token"


class _SentencePiece:
  """A SentencePiece `.model` file (LLaMA / Vicuna style), ids as the model numbers them."""

  def __init__(self, path: str):
    import sentencepiece  # imported here: the synthetic data never needs it

    try:
      self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path}: not a SentencePiece model ({e})") from e
    self.size = self.sp.get_piece_size()
    self.bos, self.eos, self.pad = (_real(self.sp.bos_id()), _real(self.sp.eos_id()),
                                    _real(self.sp.pad_id()))
    # add_dummy_prefix: every encode() call starts with a word boundary ("▁").
    self.prefix_space = self.sp.encode("a", out_type=str)[0].startswith("▁")

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: list[int]) -> str:
    return self.sp.decode(ids)  # control symbols (bos, eos, pad) decode to nothing

  def piece_id(self, piece: str) -> int | None:
    i = self.sp.piece_to_id(piece)  # the unk id when absent
    return i if self.sp.id_to_piece(i) == piece else None


# Used only when neither tokenizer_config.json nor special_tokens_map.json names the token.
_HF_GUESSES = {
    "bos_token": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos_token": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
    "pad_token": ("<pad>", "[PAD]", "<|pad|>"),
}


def _hf_special_names(folder: pathlib.Path) -> dict[str, str | None]:
  """bos/eos/pad token strings named beside tokenizer.json (None: named as absent)."""
  names: dict[str, str | None] = {}
  for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
    if (folder / file).is_file():
      cfg = json.loads((folder / file).read_text(encoding="utf-8"))
      for key in _HF_GUESSES:
        if key in cfg:
          value = cfg[key]
          names[key] = value.get("content") if isinstance(value, dict) else value
  return names


class _HuggingFace:
  """A Hugging Face `tokenizer.json` (the `tokenizers` library, no transformers)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as HFTokenizer

    self.tok = HFTokenizer.from_file(path)
    # Ids need not be contiguous; the first free id is after the largest one.
    self.size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
    named = _hf_special_names(pathlib.Path(path).parent)
    self.bos, self.eos, self.pad = (self._special(named, k) for k in _HF_GUESSES)
    first = self.tok.encode("a", add_special_tokens=False).tokens
    # Metaspace / Prepend("▁") or ByteLevel(add_prefix_space=True) start every text with a
    # word boundary, like SentencePiece's dummy prefix.
    self.prefix_space = bool(first) and first[0][:1] in ("▁", "Ġ")

  def _special(self, named: dict[str, str | None], key: str) -> int | None:
    if key in named:
      return None if named[key] is None else self.piece_id(named[key])
    return next((i for n in _HF_GUESSES[key] if (i := self.piece_id(n)) is not None), None)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.tok.decode(ids, skip_special_tokens=False)

  def piece_id(self, piece: str) -> int | None:
    return self.tok.token_to_id(piece)


class TextTokenizer:
  """A real tokenizer plus placeholder tags; build it with `load_tokenizer`.

  Ids are the model's own; a tag that the vocabulary lacks as a single token gets the next
  free id after the vocabulary (so `vocab_size` counts it). `bos_id`/`eos_id` are None when
  the model has no such token; `pad_id` is the model's pad token, else `eos_id`, else 0
  (padding is masked out of the loss, so its id only needs to be a valid embedding row).
  """

  def __init__(self, backend: _SentencePiece | _HuggingFace, tags: Sequence[str]):
    self._backend = backend
    self.tags = tuple(dict.fromkeys(tags))
    self.prefix_space = backend.prefix_space
    if not all(isinstance(t, str) and t for t in self.tags):
      raise ValueError(f"tags must be non-empty strings, got {tags!r}")
    self._tag_ids: dict[str, int] = {}
    size = backend.size
    for tag in self.tags:
      i = backend.piece_id(tag)
      if i is None:
        i, size = size, size + 1
      self._tag_ids[tag] = i
    self._tag_of = {i: t for t, i in self._tag_ids.items()}
    self._vocab_size = size

  @property
  def bos_id(self) -> int | None:
    return self._backend.bos

  @property
  def eos_id(self) -> int | None:
    return self._backend.eos

  @property
  def pad_id(self) -> int:
    for i in (self._backend.pad, self._backend.eos):
      if i is not None:
        return i
    return 0

  @property
  def vocab_size(self) -> int:
    """The model's vocabulary plus the appended tag ids (the embedding table's rows)."""
    return self._vocab_size

  def tag_id(self, tag: str) -> int:
    if tag not in self._tag_ids:
      raise ValueError(f"{tag!r} is not one of this tokenizer's tags {self.tags}")
    return self._tag_ids[tag]

  def special_id(self, token: str) -> int:
    """The id of `token` as one vocabulary entry (or a tag); ValueError naming it if none."""
    i = self._tag_ids.get(token)
    if i is None:
      i = self._backend.piece_id(token)
    if i is None:
      raise ValueError(f"the tokenizer has no {token!r} token")
    return i

  def encode(self, text: str) -> list[int]:
    """Text -> ids, no BOS/EOS; each tag is its one id, the text between encoded apart."""
    ids: list[int] = []
    for piece in split_tags(text, self.tags):
      tag = self._tag_ids.get(piece)
      ids += [tag] if tag is not None else self._backend.encode(piece)
    return ids

  def decode(self, ids) -> str:
    """Ids -> text; tags come back as their text, BOS/EOS/pad ids are dropped."""
    drop = {self._backend.bos, self._backend.eos, self._backend.pad} - set(self._tag_of)
    out, run = [], []
    for i in map(int, ids):
      if i in self._tag_of:  # the text between tags was encoded apart, so decode it apart
        out += [self._backend.decode(run), self._tag_of[i]]
        run = []
      elif i not in drop:
        run.append(i)
    return "".join(out + [self._backend.decode(run)])


def _tokenizer_file(path: str) -> pathlib.Path:
  """A file, or a directory's tokenizer.model / tokenizer.json / only `*.model`."""
  p = pathlib.Path(path)
  if p.is_file():
    return p
  if not p.is_dir():
    raise FileNotFoundError(f"no tokenizer at {path}")
  # tokenizer.model first: LLaVA loads LLaMA/Vicuna with the slow (SentencePiece) tokenizer.
  for name in ("tokenizer.model", "tokenizer.json"):
    if (p / name).is_file():
      return p / name
  models = sorted(p.glob("*.model"))
  if len(models) == 1:
    return models[0]
  raise FileNotFoundError(f"{path} has no tokenizer.model, tokenizer.json or single *.model")


def load_tokenizer(path: str, tags: Sequence[str] = (IMAGE_TAG,)) -> TextTokenizer:
  """A SentencePiece `*.model`, a Hugging Face `tokenizer.json`, or a directory with one.

  For tokenizer.json, BOS/EOS/pad come from tokenizer_config.json (else
  special_tokens_map.json) beside it, else from the usual names (`<s>`, `</s>`, ...).
  """
  file = _tokenizer_file(path)
  backend = _HuggingFace(str(file)) if file.suffix == ".json" else _SentencePiece(str(file))
  return TextTokenizer(backend, tags)
