"""`data.source=llava_json` end to end: a LLaVA-format folder, a tokenizer.json trained
here, `main.py` as the README shows it, bad records skipped and counted."""

import json
import os
import subprocess
import sys

import pytest

from mm_jax.data import export, synthetic, templates, text, tfds_source

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("llava")
  train = synthetic.export_llava(str(root), 96, split="train", image_size=32)
  records = json.load(open(train))
  records.append({"id": "broken-1", "image": "images/nope.png", "conversations":
                  records[0]["conversations"]})  # missing image
  records.append({"id": "broken-2", "conversations": records[0]["conversations"]})  # tag
  json.dump(records, open(train, "w"))
  evaluation = synthetic.export_llava(str(root), 32, split="eval", image_size=32)
  corpus = [templates.VICUNA_V1_SYSTEM + " USER: ASSISTANT:"] + [
      t["value"] for r in records for t in r["conversations"]]
  export.train_tokenizer(str(root / "tokenizer.json"), corpus * 3)
  return root, train, evaluation


@pytest.mark.parametrize("source", ["llava_json", "tfds"])
def test_main_trains_and_evaluates_on_a_llava_folder(folder, tmp_path, source):
  root, train, evaluation = folder
  tok = text.load_tokenizer(str(root / "tokenizer.json"))
  image_id = tok.tag_id("<image>")
  args = ["--config=configs/llava.py:tiny", f"--workdir={tmp_path / 'w'}",
          f"--config.data.source={source}", f"--config.data.json={train}",
          f"--config.data.tfds_dir={tmp_path / 'tfds'}",
          f"--config.data.eval_json={evaluation}", f"--config.data.image_dir={root}",
          f"--config.data.tokenizer={root / 'tokenizer.json'}",
          "--config.data.seq_len=256", "--config.data.max_skip_fraction=0.05",
          f"--config.model.image_token_id={image_id}",
          f"--config.model.decoder.vocab_size={tok.vocab_size}",
          "--config.train.steps=13", "--config.train.log_every=13", "--config.train.batch_size=8",
          "--config.checkpoint.every=13"]  # 104 rows: one pass over the 98 records
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  r = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
  last = [x for x in records if "loss" in x][-1]
  assert last["data/skipped"] == 2 and last["data/skipped/missing_image"] == 1
  assert last["data/skipped/tag_mismatch"] == 1
  assert 0 < last["data/packing_efficiency"] <= 1
  assert any(x.get("eval/samples") == 32 for x in records)
  assert "skipped record broken-1 (missing_image)" in r.stderr
  if source == "tfds":  # converted once to ArrayRecord, read without TensorFlow
    version = tfds_source.BUILDER_VERSION
    assert list((tmp_path / "tfds").glob(f"llava_records/*/{version}/*.array_record*"))


def _main(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _folder_args(folder, workdir):
  root, train, _ = folder
  return ["--config=configs/llava.py:tiny", f"--workdir={workdir}",
          "--config.data.source=llava_json", f"--config.data.json={train}",
          f"--config.data.image_dir={root}", f"--config.data.tokenizer={root / 'tokenizer.json'}"]


def test_the_tokenizer_ids_and_vocabulary_are_adopted_when_not_set(folder, tmp_path):
  root = folder[0]
  tok = text.load_tokenizer(str(root / "tokenizer.json"))
  r = _main(*_folder_args(folder, tmp_path), "--print_config")
  assert r.returncode == 0, r.stderr[-3000:]
  assert (f"config from tokenizer {root / 'tokenizer.json'}: "
          f"model.image_token_id={tok.tag_id('<image>')}, "
          f"model.decoder.vocab_size={tok.vocab_size}") in r.stdout + r.stderr
  assert f"model.image_token_id = {tok.tag_id('<image>')}\n" in r.stdout


def test_a_wrong_placeholder_id_on_the_command_line_is_a_one_line_error(folder, tmp_path):
  r = _main(*_folder_args(folder, tmp_path), "--config.model.image_token_id=128",
            "--config.data.seq_len=256")
  assert r.returncode != 0 and "config.model.image_token_id: 128" in r.stderr
  assert "Traceback" not in r.stderr
  assert len([x for x in r.stderr.splitlines() if "config.model.image_token_id" in x]) == 1


def test_export_cli_writes_a_usable_folder(tmp_path):
  paths = export.export(str(tmp_path), 4, 2)
  assert len(json.load(open(paths["train"]))) == 4 and len(json.load(open(paths["eval"]))) == 2
  tok = text.load_tokenizer(paths["tokenizer"])
  assert tok.tag_id("<image>") == tok.vocab_size - 1  # appended after the BPE vocabulary
