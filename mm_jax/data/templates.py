"""Chat templates: a conversation -> token ids and a loss mask.

The mask is true only on the answers (or the caption) and their end-of-turn token, as in
LLaVA. Each placeholder tag expands into as many placeholder ids as its tower yields.
Templates: `plain` (LLaVA stage 1), `vicuna_v1` (LLaVA-1.5's `conv_vicuna_v1`), `llama3`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mm_jax.data.text import IMAGE_TAG, Encoded, Tokenizer, split_tags

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's "
                    "questions.")
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
_LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# A template's output before tokenisation: (text, which may hold tags, or a token id, loss).
_Segment = tuple[str | int, bool]


def _turn(n: int, turn) -> tuple[str, str]:
  """One turn, (role, text) or {"from": role, "value": text} -> ("human" | "gpt", text)."""
  if isinstance(turn, Mapping):
    role, text = turn.get("from"), turn.get("value")
  elif isinstance(turn, (tuple, list)) and len(turn) == 2:
    role, text = turn
  else:
    raise ValueError(f"turn {n}: expected (role, text), got {turn!r}")
  if not isinstance(role, str) or role.lower() not in _ROLES:
    raise ValueError(f"turn {n}: unknown role {role!r}; expected one of {sorted(_ROLES)}")
  if not isinstance(text, str):
    raise ValueError(f"turn {n}: text must be a string, got {type(text).__name__}")
  return _ROLES[role.lower()], text


def _exchanges(conversation) -> list[tuple[str, str]]:
  """A conversation -> validated [(human text, gpt text)] pairs."""
  if not conversation:
    raise ValueError("empty conversation")
  turns = [_turn(n, t) for n, t in enumerate(conversation)]
  if turns[0][0] != "human":
    raise ValueError(f"the conversation must start with a human turn, not {turns[0][0]}")
  for n, (role, text) in enumerate(turns):
    if n and role == turns[n - 1][0]:
      raise ValueError(f"turns {n - 1} and {n} are both {role}; roles must alternate")
    if role == "gpt" and not text.strip():
      raise ValueError(f"turn {n}: empty gpt answer")
  if turns[-1][0] == "human":
    raise ValueError(f"turn {len(turns) - 1}: the conversation ends with an unanswered "
                     "human turn")
  return [(turns[n][1], turns[n + 1][1]) for n in range(0, len(turns), 2)]


def _bos(tok: Tokenizer) -> list[_Segment]:
  return [] if tok.bos_id is None else [(tok.bos_id, False)]


def _eos(tok: Tokenizer, template: str) -> int:
  if tok.eos_id is None:
    raise ValueError(f"the {template} template needs an end-of-sequence token; the "
                     "tokenizer has none")
  return tok.eos_id


def _plain(tok: Tokenizer, exchanges: list[tuple[str, str]], separator: str = ""
           ) -> list[_Segment]:
  """`<bos> {tags of the human turn}{separator}{caption}<eos>`: LLaVA's stage-1 pretraining.

  As LLaVA does, the human text other than its tags is dropped. (LLaVA itself ends with
  its "\\n" separator; here the caption ends with <eos>.) `separator` (not in the loss)
  sits between the tags and the caption; LLaVA has none there (render_caption).
  """
  if len(exchanges) != 1:
    raise ValueError(f"the plain template takes one human and one gpt turn, got "
                     f"{len(exchanges)} exchanges")
  human, caption = exchanges[0]
  tags = [(p, False) for p in split_tags(human, tok.tags) if p in tok.tags]
  sep = [(separator, False)] if separator else []
  return [*_bos(tok), *tags, *sep, (caption, True), (_eos(tok, "plain"), True)]


def _vicuna_v1(tok: Tokenizer, exchanges: list[tuple[str, str]]) -> list[_Segment]:
  """LLaVA-1.5's conv_vicuna_v1 (sep " ", sep2 "</s>"), as the string

  `<bos>{SYSTEM} USER: {human1} ASSISTANT: {gpt1}</s>USER: {human2} ASSISTANT: {gpt2}</s>`

  where `</s>` is the eos id. The loss covers each `{gpt}` and its `</s>`. The space after
  "ASSISTANT:" goes to the answer, as in LLaVA: a prefix-space tokenizer (SentencePiece)
  starts the answer's first piece with it ("▁The"), others get an explicit " ".
  """
  eos, space = _eos(tok, "vicuna_v1"), "" if tok.prefix_space else " "
  segments = _bos(tok)
  for n, (human, gpt) in enumerate(exchanges):
    head = VICUNA_V1_SYSTEM + " " if n == 0 else ""
    segments += [(f"{head}USER: {human} ASSISTANT:", False), (space + gpt, True), (eos, True)]
  return segments


def _llama3(tok: Tokenizer, exchanges: list[tuple[str, str]]) -> list[_Segment]:
  """Llama 3 chat (texts trimmed, as Meta's template does), no system turn:

  `<|begin_of_text|>` then per exchange
  `<|start_header_id|>user<|end_header_id|>\\n\\n{human}<|eot_id|>`
  `<|start_header_id|>assistant<|end_header_id|>\\n\\n{gpt}<|eot_id|>`
  with the special tokens as their single ids. The loss covers `{gpt}<|eot_id|>`.
  """
  begin, start, end, eot = (tok.special_id(t) for t in _LLAMA3)
  segments: list[_Segment] = [(begin, False)]
  for human, gpt in exchanges:
    segments += [(start, False), ("user", False), (end, False), ("\n\n" + human.strip(), False),
                 (eot, False)]
    segments += [(start, False), ("assistant", False), (end, False), ("\n\n", False),
                 (gpt.strip(), True), (eot, True)]
  return segments


_TEMPLATES = {"plain": _plain, "vicuna_v1": _vicuna_v1, "llama3": _llama3}
TEMPLATES = tuple(_TEMPLATES)


Expand = Mapping[int, int | Sequence[int]]


def _expansion(tok: Tokenizer, tag: str, expand: Expand, seen: dict[int, int]
               ) -> tuple[int, int]:
  """(id, count) of the next occurrence of `tag`; a list value gives one count per occurrence."""
  i = tok.tag_id(tag)
  if i not in expand:
    raise ValueError(f"expand has no count for tag {tag!r} (id {i})")
  counts, k = expand[i], seen.get(i, 0)
  seen[i] = k + 1
  if np.ndim(counts):
    if k >= len(counts):
      raise ValueError(f"expand[{i}] ({tag!r}) lists {len(counts)} counts but the text has "
                       f"more {tag} tags")
    counts = counts[k]
  if counts < 1:
    raise ValueError(f"expand[{i}] ({tag!r}) = {counts}; must be at least 1")
  return i, counts


def _encode_segments(tok: Tokenizer, segments: list[_Segment], expand: Expand) -> Encoded:
  """Segments -> ids and mask; each tag becomes its count of copies of its id, no loss."""
  ids: list[int] = []
  mask: list[bool] = []
  seen: dict[int, int] = {}  # tag id -> occurrences so far (indexes list counts)
  for item, loss in segments:
    if isinstance(item, int):
      ids.append(item)
      mask.append(loss)
      continue
    for piece in split_tags(item, tok.tags):
      if piece in tok.tags:
        i, n = _expansion(tok, piece, expand, seen)
        ids += [i] * n
        mask += [False] * n
      else:
        new = tok.encode(piece)
        ids += new
        mask += [loss] * len(new)
  for i, counts in expand.items():
    if np.ndim(counts) and len(counts) != seen.get(i, 0):
      raise ValueError(f"expand[{i}] lists {len(counts)} counts for {seen.get(i, 0)} tags")
  return Encoded(np.asarray(ids, np.int32), np.asarray(mask, bool))


def render_conversation(tok: Tokenizer, conversation, template: str, *,
                        expand: Expand) -> Encoded:
  """A conversation -> int32[L] ids and bool[L] loss mask under `template`.

  conversation: [(role, text)] or LLaVA's [{"from": role, "value": text}], roles
  human/user and gpt/assistant, alternating from human, ending with a non-empty answer.
  template: "plain", "vicuna_v1" or "llama3" (layouts in `_plain`, `_vicuna_v1`,
  `_llama3`). expand: tag id -> placeholder count, or a list of counts, one per
  occurrence of that tag in order (audio clips differ in length); a tag in the text
  becomes that many copies of its id, never in the loss. Raises ValueError for a
  malformed conversation, an unknown template or counts that do not fit the tags.
  """
  build = _TEMPLATES.get(template)
  if build is None:
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
  return _encode_segments(tok, build(tok, _exchanges(conversation)), expand)


def render_caption(tok: Tokenizer, caption: str, *, expand: Expand, separator: str = "\n",
                   tags: str = IMAGE_TAG) -> Encoded:
  """An image caption as the `plain` template renders it, with `separator` between the
  image's placeholders and the caption (data.caption_separator; "" is LLaVA's layout):
  `<bos><image>{separator}{caption}<eos>`, the loss on the caption and <eos>."""
  return _encode_segments(tok, _plain(tok, [(tags, caption)], separator), expand)
