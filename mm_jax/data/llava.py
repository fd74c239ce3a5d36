"""The `llava_json` and `tfds` sources wired into the pipeline: records -> examples.

`tfds` reads the same JSON + images, converted once into ArrayRecord files under
`data.tfds_dir` (tensorflow-datasets, no TensorFlow), and then reads records at random.

`data.json` (JSON list or JSON Lines, LLaVA's format) with images under `data.image_dir`,
tokenised by `data.tokenizer` with `data.template`; each `<image>` tag expands into as many
placeholders as the vision tower yields. Decoding runs inside grain workers.
"""

from __future__ import annotations

import grain

from mm_jax.config import ConfigError, DataConfig
from mm_jax.data import media, sources, templates, text, tfds_source
from mm_jax.data.text import IMAGE_TAG


def tokenizer_for(data: DataConfig, image_token_id: int):
  """Loads the tokenizer and checks its `<image>` id is the model's placeholder id."""
  tok = text.load_tokenizer(data.tokenizer, tags=(IMAGE_TAG,))
  if tok.tag_id(IMAGE_TAG) != image_token_id:
    raise ConfigError(f"config.model.image_token_id: {image_token_id}, but the tokenizer "
                      f"{data.tokenizer} gives {IMAGE_TAG} id {tok.tag_id(IMAGE_TAG)}; set "
                      f"--config.model.image_token_id={tok.tag_id(IMAGE_TAG)}")
  return tok


def _built_tfds(json_path: str, data: DataConfig) -> str:
  """Converts the JSON + images to ArrayRecord once (process 0; the others wait)."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_index() == 0:
    path = tfds_source.build(json_path, data.image_dir, data.tfds_dir)
  multihost_utils.sync_global_devices("mm_jax_tfds_build")
  if jax.process_index() != 0:
    path = tfds_source.build(json_path, data.image_dir, data.tfds_dir)  # reuses the build
  return path


def llava_examples(data: DataConfig, spec, *, split: str):
  """(MapDataset of records, record -> example-or-marker)."""
  from mm_jax.data import pipeline

  path = data.json if split == "train" else data.eval_json
  if not path:
    raise ConfigError("config.data.eval_json: required to evaluate a llava_json run")
  tok = tokenizer_for(data, spec.image_token_id)
  expand = {spec.image_token_id: spec.tokens_per_image}
  if data.source == "tfds":
    records = tfds_source.TfdsRecords(_built_tfds(path, data))
    parse = tfds_source.parse_tfds_record
  else:
    records = sources.LlavaJsonSource(path, data.image_dir)
    parse = lambda record: sources.parse_record(record, image_dir=data.image_dir)

  def make(record) -> dict:
    sample = parse(record)
    images = [media.preprocess(im, size=spec.image_size, aspect=data.image_aspect_ratio,
                               mean=spec.mean, std=spec.std) for im in sample.images]
    enc = templates.render_conversation(tok, sample.conversation, data.template, expand=expand)
    return pipeline.to_example(sample.id, enc, images, spec)

  describe = lambda record: str(record.get("id", "?")) if isinstance(record, dict) else "?"
  return grain.MapDataset.source(records), pipeline.guarded(make, describe)
