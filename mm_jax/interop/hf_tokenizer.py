"""The run's tokenizer as Hugging Face tokenizer files beside an exported model.

A real tokenizer (`config.data.tokenizer`: tokenizer.json or a SentencePiece .model) is
copied with its tokenizer_config.json / special_tokens_map.json; the synthetic source's
closed-vocabulary `WordTokenizer` becomes a `tokenizers` WordLevel tokenizer.json with a
whitespace pre-tokenizer. Either way `<image>` maps to the model's image_token_id where
the ids allow it, so `AutoTokenizer` / `LlavaProcessor` produce the placeholders the model
was trained on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from mm_jax.config import Config
from mm_jax.data import pipeline, text

IMAGE_TOKEN = text.IMAGE_TAG
_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _special_ids(bos: int | None, eos: int | None, pad: int | None) -> dict[str, int | None]:
  return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def _save_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def placeholders(cfg: Config) -> dict[str, int]:
  """{tag: id} of the model's placeholders an exported tokenizer maps: `<image>` (the HF
  classes always have it) and `<video>` for a video model."""
  m = cfg.model
  tags = {IMAGE_TOKEN: m.image_token_id}
  if "video" in m.modalities:
    tags[text.VIDEO_TAG] = m.video_token_id
  return tags


def write_word_level(tok: text.WordTokenizer, tags: dict[str, int], out: str,
                     max_length: int) -> dict[str, int | None]:
  """WordTokenizer -> tokenizer.json (WordLevel, WhitespaceSplit) + tokenizer_config.json."""
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

  vocab = {w: i for i, w in enumerate(tok.vocab)}
  for tag, i in tags.items():
    vocab.setdefault(tag, i)  # ids may have gaps: a sentinel id is kept
  hf = Tokenizer(models.WordLevel(vocab, unk_token=tok.vocab[tok.unk_id]))
  hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  specials = [tok.vocab[i] for i in (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id)]
  hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                         for t in (*specials, *tags)])
  hf.save(os.path.join(out, "tokenizer.json"))
  pad, bos, eos, unk = specials
  _save_json(os.path.join(out, "tokenizer_config.json"), dict(
      tokenizer_class="PreTrainedTokenizerFast", bos_token=bos, eos_token=eos, unk_token=unk,
      pad_token=pad, model_max_length=max_length, add_bos_token=False, add_eos_token=False))
  return _special_ids(tok.bos_id, tok.eos_id, tok.pad_id)


def _add_tags(path: str, tags: dict[str, int]) -> None:
  """Appends each placeholder tag, in id order, to a tokenizer.json whose next free id is
  that tag's id (a tokenizer that already has the tag keeps it)."""
  from tokenizers import AddedToken, Tokenizer

  hf = Tokenizer.from_file(path)
  for tag, i in sorted(tags.items(), key=lambda kv: kv[1]):
    if hf.token_to_id(tag) is not None:
      continue
    next_id = max(hf.get_vocab(with_added_tokens=True).values()) + 1
    if next_id != i:
      logging.warning("export: %s lacks %s and its next id %d is not its placeholder id %d; "
                      "left without it", path, tag, next_id, i)
      continue
    hf.add_special_tokens([AddedToken(tag, special=True, normalized=False)])
  hf.save(path)


def _files(path: str) -> dict[str, str]:
  """Exported name -> source file: a tokenizer file, or a folder's tokenizer files."""
  if os.path.isfile(path):
    return {"tokenizer.json" if path.endswith(".json") else "tokenizer.model": path,
            **_files_in(os.path.dirname(path), _COMPANIONS)}
  found = _files_in(path, ("tokenizer.json", "tokenizer.model", *_COMPANIONS))
  if "tokenizer.json" not in found and "tokenizer.model" not in found:
    raise FileNotFoundError(f"config.data.tokenizer: {path} has no tokenizer.json or "
                            "tokenizer.model to export")
  return found


def _files_in(folder: str, names: tuple[str, ...]) -> dict[str, str]:
  return {n: os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))}


def _piece(out: str, i: int | None) -> str | None:
  """Token string of id `i` in the exported tokenizer."""
  if i is None:
    return None
  if os.path.isfile(os.path.join(out, "tokenizer.json")):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(out, "tokenizer.json")).id_to_token(i)
  import sentencepiece as spm

  return spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model")
                                    ).id_to_piece(i)


def copy_tokenizer(path: str, tags: dict[str, int], out: str) -> dict[str, int | None]:
  """Copies the tokenizer (file or folder) and its companion configs into `out`."""
  files = _files(path)
  for name, src in files.items():
    shutil.copyfile(src, os.path.join(out, name))
  tok = text.load_tokenizer(path)
  if "tokenizer.json" in files:
    _add_tags(os.path.join(out, "tokenizer.json"), tags)
  if "tokenizer_config.json" not in files:
    fast = "tokenizer.json" in files
    _save_json(os.path.join(out, "tokenizer_config.json"), dict(
        tokenizer_class="PreTrainedTokenizerFast" if fast else "LlamaTokenizer",
        bos_token=_piece(out, tok.bos_id), eos_token=_piece(out, tok.eos_id)))
  return _special_ids(tok.bos_id, tok.eos_id, tok.pad_id)


def write(cfg: Config, out: str) -> dict[str, int | None]:
  """The run's tokenizer files in `out`; returns bos/eos/pad token ids (for the configs)."""
  if cfg.data.source == "synthetic":
    return write_word_level(pipeline.synthetic_tokenizer(), placeholders(cfg), out,
                            cfg.data.seq_len)
  if cfg.data.tokenizer:
    return copy_tokenizer(cfg.data.tokenizer, placeholders(cfg), out)
  return _special_ids(None, None, None)
