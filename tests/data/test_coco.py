"""The coco_captions source: COCO's captions JSON layout, one vs all captions, the seeded
per-epoch pick, the caption separator, and bad input skipped and counted."""

import json

import pytest
from conftest import tiny_config
from PIL import Image

from mm_jax.config import ConfigError
from mm_jax.data import coco, export, pipeline, skips, templates, text

CAPTIONS = {1: ["A red square.", "A square that is red."], 2: ["A blue circle.", "Blue  round\n"],
            3: ["A green shape."]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """3 images on disk with 5 captions; image 4's file is missing; annotation 99 points to
  an image id that `images` does not list."""
  root = tmp_path_factory.mktemp("coco")
  (root / "train2017").mkdir()
  colours = {1: (255, 0, 0), 2: (0, 0, 255), 3: (0, 255, 0)}
  for i, colour in colours.items():
    Image.new("RGB", (40, 30), colour).save(root / "train2017" / f"{i:012d}.jpg")
  images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 30, "width": 40}
            for i in (1, 2, 3, 4)]
  anns = [{"id": 10 * i + k, "image_id": i, "caption": c}
          for i, caps in CAPTIONS.items() for k, c in enumerate(caps)]
  anns += [{"id": 40, "image_id": 4, "caption": "Missing file."},
           {"id": 99, "image_id": 7, "caption": "An orphan."}]
  path = root / "captions_train2017.json"
  path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
  corpus = [c for caps in CAPTIONS.values() for c in caps] * 5
  export.train_tokenizer(str(root / "tokenizer.json"), corpus, vocab_size=300)
  return root, path


def _config(folder, **overrides):
  root, path = folder
  tok = text.load_tokenizer(str(root / "tokenizer.json"))
  values = {"data.source": "coco_captions", "data.json": str(path), "data.eval_json": str(path),
            "data.image_dir": str(root / "train2017"),
            "data.tokenizer": str(root / "tokenizer.json"),
            "data.template": "plain", "data.seq_len": 96, "data.pack": False,
            "model.image_token_id": tok.tag_id("<image>"),
            "model.decoder.vocab_size": tok.vocab_size, **overrides}
  cfg = tiny_config(**values)
  return cfg, pipeline.RowSpec.create(cfg.data, cfg.model), tok


def _one_pass(cfg, spec):
  """Every real row of one eval pass (one sample per row) and the skip counts; the pass
  ends on padding batches where records were skipped (every process runs as many)."""
  stats = skips.SkipStats()
  rows = list(pipeline.eval_iterator(cfg.data, spec, global_batch=1, stats=stats))
  return [r for r in rows if r["row_valid"].all()], stats.counts


@pytest.mark.parametrize("captions, samples", [("one", 3), ("all", 5)])
def test_sample_counts_and_skip_reasons(folder, captions, samples):
  cfg, spec, _ = _config(folder, **{"data.captions": captions})
  rows, counts = _one_pass(cfg, spec)
  assert len(rows) == samples
  assert counts == {"missing_image": 1, "bad_json": 1}


def test_orphan_annotation_and_malformed_json_are_named(folder, tmp_path):
  _, path = folder
  units = coco.read_units(str(path), "one")
  assert [u["id"] for u in units] == ["coco1", "coco2", "coco3", "coco4", "annotation99"]
  assert units[1]["captions"] == ["A blue circle.", "Blue round"]  # whitespace normalised
  error = units[-1][coco.ERROR_KEY]
  assert (error.reason, error.record_id) == ("bad_json", "annotation99")
  assert "image_id 7 has no entry in 'images'" in str(error)
  bad = tmp_path / "captions_bad.json"
  bad.write_text('{"images": [], "annotations": [,]}')
  with pytest.raises(ValueError, match=r"captions_bad\.json: invalid JSON at line 1 column"):
    coco.read_units(str(bad), "one")
  bad.write_text('[{"image_id": 1}]')
  with pytest.raises(ValueError, match=r"captions_bad\.json: expected COCO captions JSON"):
    coco.read_units(str(bad), "all")


def test_one_caption_per_image_per_epoch_is_seeded(folder):
  def picks(seed):
    cfg, spec, _ = _config(folder, **{"data.seed": seed})
    items, _ = coco.coco_examples(cfg.data, spec, split="train")
    stream = items.shuffle(seed=0).repeat(None)  # as pipeline.train_iterator
    out = {}
    for index in range(5 * 16):  # 16 epochs of 5 units
      epoch, unit = stream[index]
      assert epoch == index // 5
      if coco.ERROR_KEY not in unit:
        key = (epoch, unit["image_id"])
        assert key not in out  # each image once per epoch
        out[key] = coco.pick(unit, seed=seed, epoch=epoch)
    return out

  first = picks(0)
  assert first == picks(0) and len(first) == 4 * 16
  assert len({first[(e, 1)] for e in range(16)}) == 2  # image 1's two captions both appear
  assert first != picks(1)
  assert {first[(e, 3)] for e in range(16)} == {"A green shape."}


def test_separator_sits_between_image_and_caption_outside_the_loss(folder):
  cfg, spec, tok = _config(folder, **{"data.caption_separator": "\n"})
  p, image_id = spec.tokens_per_image, tok.tag_id("<image>")
  expand = {image_id: p}
  enc = templates.render_caption(tok, "A green shape.", expand=expand, separator="\n")
  bos = int(tok.bos_id is not None)
  sep = tok.encode("\n")
  assert sep and list(enc.tokens[bos + p:bos + p + len(sep)]) == sep
  assert not enc.answer[:bos + p + len(sep)].any() and enc.answer[bos + p + len(sep):].all()
  assert tok.decode(enc.tokens[bos + p + len(sep):-1]).strip() == "A green shape."
  plain = templates.render_caption(tok, "A green shape.", expand=expand, separator="")
  assert len(plain.tokens) == len(enc.tokens) - len(sep)
  # Through the source: image 3's sample holds the separator right after its placeholders.
  items, make = coco.coco_examples(cfg.data, spec, split="eval")
  example = make(items[2])
  tokens = example["tokens"]
  assert list(tokens[bos + p:bos + p + len(sep)]) == sep
  assert (tokens[bos:bos + p] == image_id).all() and example["images"].shape == (1, 32, 32, 3)


def test_config_checks():
  with pytest.raises(ConfigError, match="config.data.captions: must be one|all"):
    tiny_config(**{"data.captions": "some"})
  with pytest.raises(ConfigError, match="config.data.template: source=coco_captions"):
    tiny_config(**{"data.source": "coco_captions", "data.json": "a", "data.image_dir": "b",
                   "data.tokenizer": "c", "data.template": "vicuna_v1"})
  cfg = tiny_config(**{"data.template": "plain", "data.captions": "all"})
  assert (cfg.data.captions, cfg.data.caption_separator) == ("all", "\n")
