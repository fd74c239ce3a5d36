"""`python -m mm_jax.data.check`: the run's own reading of a data set, reported without a
model. Runs in-process through `check.main` (one subprocess test for the module entry)."""

import json
import os
import re
import subprocess
import sys

import pytest

from mm_jax.data import check, export

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
  """The exported shapes set (50 train, 20 eval records, 32 px PNGs, a tokenizer.json)."""
  root = tmp_path_factory.mktemp("shapes")
  return root, export.export(str(root), 50, 20)


def _args(root, paths, json_path=None, *extra):
  return ["--config=configs/llava.py:tiny", "--config.data.source=llava_json",
          f"--config.data.json={json_path or paths['train']}",
          f"--config.data.eval_json={paths['eval']}", f"--config.data.image_dir={root}",
          f"--config.data.tokenizer={paths['tokenizer']}", "--config.data.seq_len=256", *extra]


def _run(capsys, args):
  code = check.main(args)
  out, err = capsys.readouterr()
  return code, out, err


def _skips(out: str) -> dict[str, int]:
  return {r: int(n) for r, n in re.findall(r"^  skipped (\w+) +(\d+) ", out, re.MULTILINE)}


def _percentiles(out: str, label: str) -> list[int]:
  line = next(x for x in out.splitlines() if x.startswith(label))
  return [int(v) for v in re.findall(r"(?:p50|p90|p99|max) (\d+)", line)]


def test_the_exported_set_reads_clean(shapes, capsys):
  root, paths = shapes
  code, out, err = _run(capsys, _args(root, paths))
  assert code == 0, out + err
  assert "records       50 read, 50 usable, 0 skipped (0.0%)" in out
  assert "image files   50 referenced: 50 found, 0 missing" in out
  p50, p90, p99, top = _percentiles(out, "tokens/sample")
  assert 64 < p50 <= p90 <= p99 <= top <= 256  # 64 image placeholders plus the text
  assert "over it: 0 (0 truncated, 0 skipped too_long)" in out
  assert _percentiles(out, "image tokens") == [64, 64, 64, 64]  # (32 px / 4 px patches)^2
  assert "per sample: 1 (50 samples) (data.images_per_sample=1)" in out
  # One image slot per row: the packer puts one sample in each of 50 rows.
  assert "50 samples -> 50 rows (packed, batch 32)" in out and "image slots 100.0%" in out
  assert out.splitlines()[-1].startswith("OK: 0 of 50 records skipped")


def test_two_image_slots_pack_two_samples_per_row(shapes, capsys):
  root, paths = shapes
  code, out, _ = _run(capsys, _args(root, paths, None, "--config.data.images_per_sample=2",
                                    "--limit=10"))
  assert code == 0 and "10 samples -> 5 rows" in out and "image slots 100.0%" in out
  used = float(re.search(r"token slots ([\d.]+)%", out).group(1))
  assert 2 * 64 / 256 < used / 100 <= 1


def test_the_eval_split_is_read_one_sample_per_row(shapes, capsys):
  root, paths = shapes
  code, out, _ = _run(capsys, _args(root, paths, None, "--split=eval"))
  assert code == 0 and "split=eval" in out and "20 read, 20 usable" in out
  assert "20 samples -> 20 rows (one sample per row" in out


@pytest.fixture(scope="module")
def faulty(shapes):
  """JSON Lines of 50 good records and one of each fault, plus one truncated-but-kept."""
  root, paths = shapes
  good = json.load(open(paths["train"]))
  png = open(root / good[0]["image"], "rb").read()
  (root / "images" / "cut.png").write_bytes(png[:len(png) // 2])  # header fine, data cut
  turns = good[0]["conversations"]
  ask = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  bad = [{"id": "missing", "image": "images/nope.png", "conversations": turns},
         {"id": "corrupt", "image": "images/cut.png", "conversations": turns},
         {"id": "two-tags", "image": good[0]["image"],
          "conversations": ask("<image> <image> what?", "a circle")},
         {"id": "no-value", "image": good[0]["image"], "conversations": [{"from": "human"}]},
         {"id": "long-question", "image": good[0]["image"],
          "conversations": ask("<image>\n" + "red circle " * 200, "yes")},
         {"id": "long-answer", "image": good[0]["image"],
          "conversations": ask("<image>\nwhat?", "red circle " * 200)}]
  lines = [json.dumps(r) for r in good[:25] + bad + good[25:]]
  lines.insert(10, '{"id": "broken", "conversations": [')
  path = root / "faulty.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return root, paths, str(path)


def test_each_planted_fault_is_counted_once_and_fails_the_threshold(faulty, capsys):
  root, paths, jsonl = faulty
  code, out, err = _run(capsys, _args(root, paths, jsonl))
  assert code == 1, out + err
  assert _skips(out) == {"bad_conversation": 1, "bad_json": 1, "corrupt_image": 1,
                         "missing_image": 1, "tag_mismatch": 1, "too_long": 1}
  assert "records       57 read, 51 usable, 6 skipped (10.5%)" in out
  assert "image files   52 referenced: 51 found, 1 missing" in out  # cut.png exists
  assert "over it: 2 (1 truncated, 1 skipped too_long)" in out
  assert _percentiles(out, "tokens/sample")[-1] > 256
  last = out.splitlines()[-1]
  assert last.startswith("FAIL: 6 of 57 records skipped") and "data.max_skip_fraction=0.01" in last


def test_a_looser_threshold_passes_the_same_folder(faulty, capsys):
  root, paths, jsonl = faulty
  code, out, _ = _run(capsys, _args(root, paths, jsonl, "--config.data.max_skip_fraction=0.9"))
  assert code == 0 and out.splitlines()[-1].startswith("OK: 6 of 57 records skipped")


@pytest.mark.parametrize("case", ["empty_list", "no_file", "not_json", "unknown_key", "limit"])
def test_a_config_error_is_one_line_and_exit_2(shapes, tmp_path, capsys, case):
  root, paths = shapes
  empty = tmp_path / "empty.json"
  empty.write_text("[]")
  broken = tmp_path / "broken.json"
  broken.write_text("[{oops")
  args, want = {
      "empty_list": (_args(root, paths, str(empty)),
                     f"config error: config.data.json: {empty} holds no records"),
      "no_file": (_args(root, paths, str(tmp_path / "nope.json")),
                  f"config error: config.data.json: no file {tmp_path / 'nope.json'}"),
      "not_json": (_args(root, paths, str(broken)),
                   f"config error: {broken}: invalid JSON at line 1 column 3"),
      "limit": (_args(root, paths, None, "--limit=0"), "flag error: flag --limit=0:"),
      "unknown_key": (_args(root, paths, None, "--config.data.seqlen=9"),
                      "config error: config.data.seqlen: unknown key; did you mean "
                      "config.data.seq_len?")}[case]
  code, out, err = _run(capsys, args)
  assert code == 2 and len(err.splitlines()) == 1 and err.startswith(want), err
  assert "records" not in out


def test_the_synthetic_source_reads_a_fixed_number_of_samples(capsys):
  code, out, _ = _run(capsys, ["--config=configs/llava.py:tiny", "--limit=64"])
  assert code == 0 and "source=synthetic split=train (64 records)" in out
  assert "64 read, 64 usable, 0 skipped" in out and "none (generated in process)" in out


def test_the_module_runs_as_a_command(shapes):
  root, paths = shapes
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  r = subprocess.run([sys.executable, "-m", "mm_jax.data.check", *_args(root, paths),
                      "--limit=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "5 read, 5 usable" in r.stdout and "Traceback" not in r.stderr
