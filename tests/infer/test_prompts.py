"""Generation prompts are exactly the training samples' prefixes, for every template."""

import numpy as np
import pytest

from mm_jax.data import templates
from mm_jax.data.export import train_tokenizer
from mm_jax.data.text import IMAGE_TAG, load_tokenizer
from mm_jax.infer import prompts, vqa


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  corpus = ["what shape is it ? a red circle and two blue squares", "USER: ASSISTANT:"] * 50
  train_tokenizer(path, corpus, vocab_size=300)
  return path


def test_synthetic_prompt_is_the_training_prefix(tiny):
  cfg = tiny()
  tok = prompts.tokenizer_for(cfg)
  ids = prompts.encode(cfg, tok, "What shape is it?", n_images=1)
  per = cfg.model.vision.tokens_per_image
  want = [tok.bos_id] + [cfg.model.image_token_id] * per + tok.encode(
      ["what", "shape", "is", "it", "?"])
  assert ids.tolist() == want
  assert prompts.stop_ids(cfg, tok) == (tok.eos_id,)


def test_synthetic_prompt_errors_name_the_problem(tiny):
  cfg = tiny()
  tok = prompts.tokenizer_for(cfg)
  with pytest.raises(prompts.PromptError, match=r"\['this'\] are not in the synthetic"):
    prompts.encode(cfg, tok, "what is this?", n_images=1)
  with pytest.raises(prompts.PromptError, match="2 <image> tags but 1 image item"):
    prompts.encode(cfg, tok, f"{IMAGE_TAG} {IMAGE_TAG} what shape is it?", n_images=1)


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
def test_template_prompt_is_the_training_prefix(tiny, bpe, template):
  tok = load_tokenizer(bpe, tags=(IMAGE_TAG,))
  cfg = tiny(**{"data.source": "llava_json", "data.json": "x.json", "data.image_dir": ".",
                "data.tokenizer": bpe, "data.template": template,
                "model.image_token_id": tok.tag_id(IMAGE_TAG)})
  text = "what shape is it ?" if template == "vicuna_v1" else ""
  ids = prompts.encode(cfg, tok, text, n_images=1)
  sample = templates.render_conversation(
      tok, [("human", f"{IMAGE_TAG}\n{text}"), ("gpt", "a red circle")], template,
      expand={cfg.model.image_token_id: cfg.model.vision.tokens_per_image})
  first_answer = int(np.argmax(sample.answer))
  assert ids.tolist() == sample.tokens[:first_answer].tolist()
  assert tok.eos_id in prompts.stop_ids(cfg, tok)


def test_vqa_normalisation_and_row_split():
  assert vqa.normalise("The Red circle.") == vqa.normalise("red  circle") == "red circle"
  batch = {"tokens": np.array([[1, 5, 6, 7, 0], [0, 0, 0, 0, 0]]),
           "targets": np.array([[5, 6, 7, 2, 0], [0, 0, 0, 0, 0]]),
           "loss_mask": np.array([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool)}
  p, a = vqa.split_rows(batch)
  assert [x.tolist() for x in p] == [[1, 5, 6]] and [x.tolist() for x in a] == [[7, 2]]
