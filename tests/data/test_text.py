"""Real tokenizers (tiny ones trained here) and chat templates in mm_jax.data.text."""

import io
import json
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mm_jax.data import templates, text
from mm_jax.data.text import IMAGE_TAG

WORDS = ("a the cat dog sat on mat red blue what is this it and picture describe "
         "USER ASSISTANT : ? . chat between curious user artificial intelligence assistant "
         "gives helpful detailed polite answers to questions").split()
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|eot_id|>"]
# Two exchanges, an image in the first human turn (LLaVA puts "<image>\n" first).
CONVERSATION = [("human", "<image>\nWhat is this?"), ("gpt", "a cat"),
                ("human", "and the mat?"), ("gpt", "it is red")]


def _corpus() -> list[str]:
  rng = random.Random(0)
  return [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]


def _train_sp(path, **extra) -> str:
  """A tiny BPE SentencePiece model numbered like LLaMA's: unk 0, bos 1, eos 2, no pad."""
  buf = io.BytesIO()
  options = dict(vocab_size=150, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                 normalization_rule_name="identity", remove_extra_whitespaces=False,
                 character_coverage=1.0, minloglevel=2)
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=buf,
                                 **(options | extra))
  path.write_bytes(buf.getvalue())
  return str(path)


def _train_hf(folder, specials: list[str], config: dict | None = None) -> str:
  """A tiny byte-level BPE (Llama 3 / GPT-2 style) saved as folder/tokenizer.json."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(), trainer)
  folder.mkdir()
  tok.save(str(folder / "tokenizer.json"))
  if config is not None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return str(folder)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  (root / "sp_dir").mkdir()  # <image> already a piece, a pad id; loaded by directory
  _train_sp(root / "sp_dir" / "tokenizer.model", user_defined_symbols=[IMAGE_TAG], pad_id=3)
  return {
      "sp": _train_sp(root / "llama.model"),
      "sp_dir": str(root / "sp_dir"),
      "hf": _train_hf(root / "hf", ["<s>", "</s>"]),
      "llama3": _train_hf(root / "llama3", LLAMA3 + [IMAGE_TAG], config={
          "bos_token": "<|begin_of_text|>", "pad_token": None,
          "eos_token": {"content": "<|end_of_text|>", "special": True}}),
  }


def _enc(tok, *parts):
  """Expected ids: strings through tok.encode, ints as they are, lists spliced."""
  ids = []
  for p in parts:
    ids += tok.encode(p) if isinstance(p, str) else (p if isinstance(p, list) else [p])
  return ids


def _check(enc, tok, prompt_parts_and_answers):
  """prompt_parts_and_answers: [(parts, in_loss)] in order -> exact ids and mask."""
  ids, mask = [], []
  for parts, loss in prompt_parts_and_answers:
    new = _enc(tok, *parts)
    ids += new
    mask += [loss] * len(new)
  np.testing.assert_array_equal(enc.tokens, np.asarray(ids, np.int32))
  np.testing.assert_array_equal(enc.answer, np.asarray(mask, bool))
  assert enc.tokens.dtype == np.int32 and enc.answer.dtype == bool


# ------------------------------------------------------------------------------ tokenizers


def test_split_tags():
  tags = ("<image>", "<video>")
  assert text.split_tags("a <image>b<video><image>", tags) == [
      "a ", "<image>", "b", "<video>", "<image>"]
  assert text.split_tags("no tags", tags) == ["no tags"]
  assert text.split_tags("", tags) == []
  assert text.split_tags("x<image>", ()) == ["x<image>"]


def test_sentencepiece_tags_appended(paths):
  tok = text.load_tokenizer(paths["sp"], tags=(IMAGE_TAG, "<video>"))
  base = spm.SentencePieceProcessor(model_file=paths["sp"]).get_piece_size()
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad: falls back to eos
  assert (tok.tag_id(IMAGE_TAG), tok.tag_id("<video>"), tok.vocab_size) == (base, base + 1,
                                                                             base + 2)
  assert tok.prefix_space
  s = "a cat <image> sat on the mat<video>"
  ids = tok.encode(s)
  assert ids == _enc(tok, "a cat ", base, " sat on the mat", base + 1)
  assert ids.count(base) == 1 and 1 not in ids and 2 not in ids  # no bos/eos added
  assert tok.decode(ids) == s
  assert tok.decode([1] + tok.encode("the dog") + [2]) == "the dog"
  with pytest.raises(ValueError, match="<audio>"):
    tok.tag_id("<audio>")


def test_sentencepiece_tag_in_vocab_from_directory(paths):
  tok = text.load_tokenizer(paths["sp_dir"])
  sp = spm.SentencePieceProcessor(model_file=paths["sp_dir"] + "/tokenizer.model")
  assert tok.tag_id(IMAGE_TAG) == sp.piece_to_id(IMAGE_TAG) < sp.get_piece_size()
  assert tok.vocab_size == sp.get_piece_size()
  assert tok.pad_id == 3
  assert tok.encode("a<image>cat") == _enc(tok, "a", tok.tag_id(IMAGE_TAG), "cat")


def test_hf_tag_never_split(paths):
  tok = text.load_tokenizer(paths["hf"], tags=[IMAGE_TAG])
  raw = Tokenizer.from_file(paths["hf"] + "/tokenizer.json")
  assert len(raw.encode(IMAGE_TAG).ids) > 1  # the model alone would cut it into pieces
  base = raw.get_vocab_size()
  assert (tok.tag_id(IMAGE_TAG), tok.vocab_size) == (base, base + 1)
  # No tokenizer_config.json: bos/eos guessed from the usual names, pad falls back to eos.
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
  assert not tok.prefix_space
  s = "what is <image><image> this?\n"
  ids = tok.encode(s)
  assert ids == _enc(tok, "what is ", [base, base], " this?\n")
  assert tok.decode(ids) == s
  assert tok.decode(np.asarray([0, *tok.encode("red dog"), 1])) == "red dog"


def test_hf_tag_in_vocab_and_config(paths):
  tok = text.load_tokenizer(paths["llama3"])
  raw = Tokenizer.from_file(paths["llama3"] + "/tokenizer.json")
  assert tok.tag_id(IMAGE_TAG) == raw.token_to_id(IMAGE_TAG)
  assert tok.vocab_size == raw.get_vocab_size()
  assert tok.bos_id == raw.token_to_id("<|begin_of_text|>")
  assert tok.eos_id == tok.pad_id == raw.token_to_id("<|end_of_text|>")
  assert tok.special_id("<|eot_id|>") == raw.token_to_id("<|eot_id|>")


def test_pickles(paths):
  for key in ("sp", "llama3"):  # grain workers receive the tokenizer pickled
    tok = text.load_tokenizer(paths[key])
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("the cat <image>") == tok.encode("the cat <image>")


def test_missing_tokenizer(tmp_path):
  with pytest.raises(FileNotFoundError):
    text.load_tokenizer(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError):
    text.load_tokenizer(str(tmp_path))


# ------------------------------------------------------------------------------- templates


def test_plain(paths):
  tok = text.load_tokenizer(paths["sp"])
  img = tok.tag_id(IMAGE_TAG)
  conv = [("human", "Describe <image> briefly."), ("gpt", "a red cat on the mat")]
  enc = templates.render_conversation(tok, conv, "plain", expand={img: 3})
  _check(enc, tok, [([1, [img] * 3], False), (["a red cat on the mat", 2], True)])


def test_vicuna_v1_sentencepiece(paths):
  tok = text.load_tokenizer(paths["sp"])
  img = tok.tag_id(IMAGE_TAG)
  enc = templates.render_conversation(tok, CONVERSATION, "vicuna_v1", expand={img: 4})
  # The answer's leading space is SentencePiece's own dummy prefix ("▁a").
  _check(enc, tok, [
      ([1, templates.VICUNA_V1_SYSTEM + " USER: ", [img] * 4, "\nWhat is this? ASSISTANT:"], False),
      (["a cat", 2], True),
      (["USER: and the mat? ASSISTANT:"], False),
      (["it is red", 2], True)])
  assert tok.decode(enc.tokens[enc.answer]) == "a cat it is red"


def test_vicuna_v1_byte_level_string(paths):
  tok = text.load_tokenizer(paths["hf"])
  img = tok.tag_id(IMAGE_TAG)
  enc = templates.render_conversation(tok, CONVERSATION, "vicuna_v1", expand={img: 2})
  _check(enc, tok, [
      ([0, templates.VICUNA_V1_SYSTEM + " USER: ", [img] * 2, "\nWhat is this? ASSISTANT:"], False),
      ([" a cat", 1], True),
      (["USER: and the mat? ASSISTANT:"], False),
      ([" it is red", 1], True)])
  # LLaVA's conv_vicuna_v1.get_prompt() string, <image> expanded, </s> (eos) dropped.
  prompt = (f"{templates.VICUNA_V1_SYSTEM} USER: <image><image>\nWhat is this? ASSISTANT: a cat</s>"
            "USER: and the mat? ASSISTANT: it is red</s>")
  assert tok.decode(enc.tokens) == prompt.replace("</s>", "")


def test_llama3(paths):
  tok = text.load_tokenizer(paths["llama3"])
  img = tok.tag_id(IMAGE_TAG)
  begin, start, end, eot = (tok.special_id(t) for t in
                            ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"))
  conv = [(r, t) for r, t in zip(["user", "assistant"] * 2, [t for _, t in CONVERSATION],
                                 strict=True)]
  enc = templates.render_conversation(tok, conv, "llama3", expand={img: 3})

  def user(*body):
    return ([start, "user", end, "\n\n", *body, eot], False)

  assistant_head = ([start, "assistant", end, "\n\n"], False)
  _check(enc, tok, [([begin], False), user([img] * 3, "\nWhat is this?"), assistant_head,
                    (["a cat", eot], True), user("and the mat?"), assistant_head,
                    (["it is red", eot], True)])
  turn = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
  expected = "".join(turn.format(r, t.replace(IMAGE_TAG, IMAGE_TAG * 3)) for r, t in conv)
  assert tok.decode(enc.tokens) == expected  # <|begin_of_text|> is bos: decoded as nothing


def test_llama3_missing_special_token(paths):
  tok = text.load_tokenizer(paths["hf"])
  with pytest.raises(ValueError, match=r"<\|begin_of_text\|>"):
    templates.render_conversation(tok, CONVERSATION, "llama3", expand={tok.tag_id(IMAGE_TAG): 1})


def test_roles_aliases_and_llava_dicts(paths):
  tok = text.load_tokenizer(paths["sp"])
  expand = {tok.tag_id(IMAGE_TAG): 2}
  aliased = [("user" if r == "human" else "assistant", t) for r, t in CONVERSATION]
  dicts = [{"from": r, "value": t} for r, t in CONVERSATION]
  want = templates.render_conversation(tok, CONVERSATION, "vicuna_v1", expand=expand)
  for conv in (aliased, dicts):
    got = templates.render_conversation(tok, conv, "vicuna_v1", expand=expand)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.answer, want.answer)


def test_word_tokenizer_follows_the_protocol():
  tok = text.WordTokenizer(("a", "red", "cat"), tags=(IMAGE_TAG,))
  img = tok.tag_id(IMAGE_TAG)
  assert img == tok.vocab_size - 1 and tok.encode("a <image>red cat") == [4, img, 5, 6]
  enc = templates.render_conversation(tok, [("human", "<image>"), ("gpt", "red cat")], "plain",
                                 expand={img: 2})
  _check(enc, tok, [([1, img, img], False), ([5, 6, 2], True)])


def test_expansion_lists_give_one_count_per_occurrence():
  tok = text.WordTokenizer(("a", "red", "cat"), tags=(IMAGE_TAG, text.AUDIO_TAG))
  img, aud = tok.tag_id(IMAGE_TAG), tok.tag_id(text.AUDIO_TAG)
  conv = [("human", "<audio> a <image> <audio>"), ("gpt", "red cat")]
  enc = templates.render_conversation(tok, conv, "plain", expand={img: 1, aud: [3, 1]})
  _check(enc, tok, [([1, aud, aud, aud, img, aud], False), ([5, 6, 2], True)])
  for counts, match in (([3], "lists 1 counts but the text has more"),
                        ([3, 1, 2], "lists 3 counts for 2 tags"), ([3, 0], "must be at least 1")):
    with pytest.raises(ValueError, match=match):
      templates.render_conversation(tok, conv, "plain", expand={img: 1, aud: counts})


@pytest.mark.parametrize("conv, template, match", [
    ([], "plain", "empty conversation"),
    ([("gpt", "a cat"), ("human", "what?")], "vicuna_v1", "start with a human"),
    ([("human", "hi"), ("human", "what?"), ("gpt", "a cat")], "vicuna_v1", "both human"),
    ([("human", "what?"), ("gpt", "a"), ("gpt", "b")], "llama3", "both gpt"),
    ([("human", "what?"), ("gpt", "  ")], "vicuna_v1", "empty gpt answer"),
    ([("human", "what?"), ("robot", "a cat")], "vicuna_v1", "unknown role 'robot'"),
    ([("human", "what?"), ("gpt", "a cat"), ("human", "and?")], "vicuna_v1", "unanswered"),
    (CONVERSATION, "plain", "one human and one gpt turn"),
    (CONVERSATION, "chatml", "unknown template 'chatml'"),
])
def test_errors(paths, conv, template, match):
  tok = text.load_tokenizer(paths["llama3"])
  with pytest.raises(ValueError, match=match):
    templates.render_conversation(tok, conv, template, expand={tok.tag_id(IMAGE_TAG): 1})


def test_missing_expansion(paths):
  tok = text.load_tokenizer(paths["sp"])
  with pytest.raises(ValueError, match="no count for tag '<image>'"):
    templates.render_conversation(tok, CONVERSATION, "vicuna_v1", expand={})


def test_render_turns_put_every_answer_and_its_eos_in_the_loss():
  tok = text.WordTokenizer(("a", "red", "cat", "?"), tags=(IMAGE_TAG,))
  enc = text.render(tok, [IMAGE_TAG, "a", "?"], ["red"], image_token_id=9, tokens_per_image=2,
                    turns=[(["cat", "?"], ["a", "cat"])])
  a, red, cat, q = tok.encode(["a", "red", "cat", "?"])
  np.testing.assert_array_equal(enc.tokens, [tok.bos_id, 9, 9, a, q, red, tok.eos_id,
                                             cat, q, a, cat, tok.eos_id])
  np.testing.assert_array_equal(enc.answer, [0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1])
