"""The README's command, end to end, as a user runs it (subprocess on CPU)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, env_extra=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env_extra or {})}
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_train_then_eval_writes_what_a_user_expects(tmp_path):
  w = str(tmp_path / "w")
  args = ["--config=configs/llava.py:tiny", f"--workdir={w}", "--config.train.steps=12",
          "--config.train.log_every=4", "--config.checkpoint.every=6",
          "--config.train.batch_size=8", "--config.data.num_eval=16"]
  r = _main(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 12/12 loss" in r.stdout and "tok/s" in r.stdout and "eta" in r.stdout
  assert "final eval at step 12" in r.stdout
  assert "step 12/12 loss" in r.stdout and "(mean of 4)" in r.stdout  # the window's mean
  assert f"outputs in {w}: checkpoints/12, config.json, metrics.jsonl" in r.stdout
  assert f"python -m mm_jax.interop.hf export --workdir={w} --out={w}_hf" in r.stdout
  cfg = json.load(open(os.path.join(w, "config.json")))
  assert cfg["train"]["steps"] == 12 and cfg["model"]["vision"]["kind"] == "clip"
  records = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [4, 8, 12]
  for key in ("step", "loss", "loss_mean", "lr", "tokens_per_s", "mfu", "data/skipped"):
    assert key in train[-1], key
  assert train[-1]["loss_window"] == 4
  assert train[-1]["mfu"] is None  # no known peak FLOP/s for a CPU
  assert any("eval/accuracy" in r for r in records)
  assert os.listdir(os.path.join(w, "tensorboard"))
  assert sorted(os.listdir(os.path.join(w, "checkpoints")), key=int) == ["6", "12"]

  # Only --workdir, as the run's last line says: its config.json (batch 8, 16 eval records).
  r = _main("--mode=eval", f"--workdir={w}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"--mode=eval uses {w}/config.json (the run's config); overrides: none" in r.stdout
  result = json.load(open(os.path.join(w, "eval_12.json")))
  assert result["step"] == 12 and 0.0 <= result["eval/accuracy"] <= 1.0
  assert 0.0 <= result["eval/vqa_accuracy"] <= 1.0
  assert result["eval/samples"] == 16
  # A shape-changing override is refused in one line naming the key; another preset's
  # file is no matter (its keys were not given).
  r = _main("--mode=eval", "--config=configs/llava.py:tiny", f"--workdir={w}",
            "--config.model.decoder.width=64")
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith(
      "config error: config.model.decoder.width: 64 on the command line, 128 in "), r.stderr
  r = _main("--mode=eval", "--config=configs/mimo.py:tiny", f"--workdir={w}",
            "--config.train.eval_batches=1")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "overrides: train.eval_batches=1" in r.stdout

  image = shape_png(tmp_path)
  r = _main("--mode=generate", *args, f"--image={image}", "--prompt=What shape is it?")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"[{w}/checkpoints step 12] 'What shape is it?' -> " in r.stdout
  r = _main("--mode=generate", *args, f"--image={image}", "--prompt=What is this?")
  assert r.returncode != 0 and "['this'] are not in the synthetic vocabulary" in r.stderr
  r = _main("--mode=generate", *args, f"--image={tmp_path}/missing.png", "--prompt=what?")
  assert r.returncode != 0 and "missing.png" in r.stderr and "Traceback" not in r.stderr


def shape_png(folder) -> str:
  """A held-out synthetic image as a PNG file (what a user would pass to --image)."""
  from PIL import Image

  from mm_jax.data import synthetic

  path = str(folder / "shape.png")
  ex = synthetic.example(0, split="eval", seed=0, image_size=32, task="qa")
  Image.fromarray(ex["image"]).save(path)
  return path


def test_dry_run_7b_and_bad_override_names_the_key():
  r = _main("--config=configs/llava.py:7b,stage=pretrain", "--dry_run", "--nomemory_plan")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "7,062,902,784" in r.stdout and "trainable (stage=pretrain)" in r.stdout
  r = _main("--config=configs/llava.py:tiny", "--dry_run", "--config.optim.lr=-1.0")
  assert r.returncode != 0 and "config.optim.lr: must be positive" in r.stderr


@pytest.mark.slow
def test_tiny_learns_well_above_chance(tmp_path):
  """The README's tiny run, shortened: chance over the question mix is about 0.3."""
  r = _main("--config=configs/llava.py:tiny", f"--workdir={tmp_path}",
            "--config.train.steps=500")
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  final = [r for r in records if "eval/accuracy" in r][-1]
  assert final["eval/accuracy"] > 0.6, final
  # Greedy generation with the KV cache answers as teacher forcing predicts.
  assert abs(final["eval/vqa_accuracy"] - final["eval/accuracy"]) < 0.02, final


@pytest.mark.parametrize("case", ["file_workdir", "diverged"])
def test_startup_and_divergence_errors_are_one_line_with_their_exit_code(tmp_path, case):
  """Exit codes of mm_jax/faults.py: 1 for a workdir that is a file, 3 for divergence."""
  w = tmp_path / "w"
  args = ["--config=configs/llava.py:tiny", f"--workdir={w}", "--config.train.batch_size=8",
          "--config.train.steps=30", "--config.train.log_every=1"]
  if case == "file_workdir":
    w.write_text("not a directory")
  else:
    args += ["--config.optim.lr=1e30", "--config.train.max_nonfinite_steps=3"]
  r = _main(*args)
  assert r.returncode == (1 if case == "file_workdir" else 3), r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  if case == "file_workdir":
    assert last == f"config error: --workdir={w}: exists and is not a directory"
  else:
    assert last.startswith("diverged: 3 non-finite steps in a row, steps "), last
    records = [json.loads(line) for line in open(w / "metrics.jsonl")]  # valid JSON
    assert any(r.get("loss") is None for r in records)


def test_target_without_its_compiler_is_one_line_with_the_pip_command():
  import importlib.util

  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed here: tests/targets compile with it")
  r = _main("--config=configs/llava.py:tiny", "--target=v5p-8")
  assert r.returncode == 1, r.stdout[-2000:]
  assert r.stderr.strip() == ("--target=v5p-8: the TPU compiler (libtpu) is not installed: "
                              f"pip install 'jax[tpu]=={_jax_version()}'")


def _jax_version() -> str:
  import jax

  return jax.__version__
