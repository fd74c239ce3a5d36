"""Start-up errors are one line naming the key or file and the fix (mm_jax/cli.py); a
traceback only under --debug. Each case runs main.py as a user does."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/llava.py:tiny"


def _main(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,line", [
    ((TINY, "--workdir=W", "--config.model.decoder.widht=3"),
     "config error: config.model.decoder.widht: unknown key; did you mean "
     "config.model.decoder.width?"),
    ((TINY,), "config error: --workdir: required for --mode=train and --mode=eval"),
    ((TINY, "--mode=eval"), "config error: --workdir: required"),
    (("--config=configs/nope.py:tiny", "--workdir=W"),
     "config error: --config=configs/nope.py:tiny: no file configs/nope.py"),
    (("--config=configs/llava.py:huge", "--workdir=W"),
     "config error: --config=configs/llava.py:huge: configs/llava.py: unknown preset 'huge'; "
     "known ['13b', '1b', '7b', 'phi2', 'tiny']"),
    ((TINY, "--dry_run", "--config.mesh.fsdp=3"),
     "config error: config.mesh: 1 devices not divisible by 3"),
    ((TINY, "--workdir=W", "--config.optim.lr=abc"),
     "flag error: flag --config.optim.lr=abc: could not convert string to float: 'abc'"),
    ((TINY, "--workdir=W", "--config.optim.lr=-1.0"),
     "config error: config.optim.lr: must be positive"),
    ((TINY, "--workdir=W", "--config.init.llava_from_hf=/nowhere"),
     "error: /nowhere/config.json: missing (a Hugging Face model folder has config.json)"),
], ids=["typo_key", "no_workdir", "eval_no_workdir", "missing_file", "unknown_preset", "mesh",
        "bad_float", "bad_value", "missing_folder"])
def test_a_startup_error_is_one_line(tmp_path, args, line):
  args = [a.replace("=W", f"={tmp_path / 'w'}") for a in args]
  r = _main(*args)
  assert r.returncode == 1, r.stderr[-3000:]
  lines = [x for x in r.stderr.splitlines() if x.strip() and "mm_jax:" not in x]
  assert len(lines) == 1 and lines[0].startswith(line), r.stderr[-3000:]
  assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.parametrize("flag", ["--help", "--helpfull"])
def test_help_prints_the_flags_and_exits_0(flag):
  r = _main(flag)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "--workdir: Checkpoints, metrics and config.json." in r.stdout
  assert ("\nabsl.logging:\n" in r.stdout) == (flag == "--helpfull")  # absl's flags too


def test_debug_shows_the_traceback():
  r = _main(TINY, "--dry_run", "--config.mesh.fsdp=3", "--debug")
  assert r.returncode != 0 and "Traceback" in r.stderr


def test_print_config_lists_every_key_resolved():
  r = _main(TINY, "--print_config", "--config.model.remat=full")
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout.splitlines()
  assert "model.remat = 'full'" in out and "model.vision.feature_select = 'patch'" in out
  assert any(x.startswith("lora.rank = ") for x in out)
  assert any(x.startswith("checkpoint.every = ") for x in out)
