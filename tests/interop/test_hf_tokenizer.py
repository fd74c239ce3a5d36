"""The run's tokenizer beside an exported model: AutoTokenizer loads it, <image> included."""

import json

from hf_models import transformers

from mm_jax.data import export as data_export
from mm_jax.data import text
from mm_jax.interop import hf_tokenizer


def test_copied_tokenizer_json_gains_the_image_token(tmp_path, tiny):
  src, out = tmp_path / "src", tmp_path / "out"
  src.mkdir()
  out.mkdir()
  data_export.train_tokenizer(str(src / "tokenizer.json"),
                              ["a red circle and a blue square"] * 3, vocab_size=60)
  ours = text.load_tokenizer(str(src))  # <image> gets the first free id, as in training
  image_id = ours.tag_id(text.IMAGE_TAG)
  cfg = tiny(**{"data.source": "llava_json", "data.json": "x", "data.image_dir": "y",
                "data.tokenizer": str(src), "model.image_token_id": image_id})
  special = hf_tokenizer.write(cfg, str(out))
  assert special == {"bos_token_id": ours.bos_id, "eos_token_id": ours.eos_id,
                     "pad_token_id": ours.pad_id}
  assert json.loads((out / "tokenizer_config.json").read_text())["bos_token"] == "<s>"
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  prompt = "a red <image> circle"
  assert tok(prompt, add_special_tokens=False).input_ids == ours.encode(prompt)
  assert tok.convert_tokens_to_ids("<image>") == image_id
