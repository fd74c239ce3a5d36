"""launch/sweep.py: every config file's sweep survives the trip through main.py's flags.

The check that matters is the real one: each trial's argv, parsed by config_flags exactly as
main.py defines its --config flag, must give a config holding the trial's values.
"""

import pytest
from absl import flags
from ml_collections import config_flags

from launch import sweep as h

CONFIGS = ["configs/llava.py:tiny", "configs/llava.py:7b,stage=finetune",
           "configs/mimo.py:tiny", "configs/mimo.py:7b"]


def _parse(argv: list[str]):
  """main.py's --config flag in a fresh FlagValues; the overrides come from `argv`."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", "configs/llava.py:tiny", "Run config.",
                                  flag_values=fv, sys_argv=["main.py", *argv])
  fv(["main.py", *argv])
  return fv.config


def _get(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


@pytest.mark.parametrize("config", CONFIGS)
def test_every_trial_parses_back(config):
  trials = h.trials(config)
  assert len(trials) > 1 and all(trials)
  for trial in trials:
    argv = h.to_flags(trial, config)
    assert argv[0] == f"--config={config}"
    parsed = _parse(argv)
    for key, value in trial.items():
      assert _get(parsed, key) == value, (argv, key)


def test_tiny_sweep_is_lr_by_warmup():
  trials = h.trials("configs/llava.py:tiny")
  assert len(trials) == 6
  assert trials[1] == {"optim.lr": 1e-3, "optim.warmup_steps": 50}


def test_booleans_tuples_and_strings_parse_back():
  trial = {"checkpoint.async_save": False, "eval.generate": True,
           "model.modalities": ("image", "video"), "optim.freeze": (r"^towers/",),
           "generate.stop": [], "data.json": "/data/a b.json", "optim.lr": 3e-5,
           "train.steps": 7}
  argv = h.to_flags(trial, "configs/llava.py:tiny")
  assert argv[1:3] == ["--noconfig.checkpoint.async_save", "--config.eval.generate"]
  assert argv[3] == "--config.model.modalities=('image', 'video')"
  parsed = _parse(argv)
  for key, value in trial.items():
    expected = tuple(value) if isinstance(value, list) else value
    assert _get(parsed, key) == expected, key


def test_no_hook_is_one_empty_trial(tmp_path):
  path = tmp_path / "plain.py"
  path.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                  "  return ml_collections.ConfigDict({'a': 1})\n")
  assert h.trials(f"{path}:x") == [{}]
  assert h.to_flags({}, f"{path}:x") == [f"--config={path}:x"]


def test_product_and_zip_counts():
  a, b, c = h.sweep("a", [1, 2, 3]), h.sweep("b", "xy"), h.sweep("c", [True, False, None])
  assert len(h.product(a, b)) == 6
  assert h.product(a, b)[:2] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}]
  assert h.zip_(a, c)[2] == {"a": 3, "c": None}
  assert len(h.product(h.zip_(a, c), b)) == 6
  assert h.product() == [{}] and h.zip_() == []


def test_errors_are_one_line():
  with pytest.raises(ValueError, match=r"^zip_: sweeps of unequal lengths \[3, 2\]$"):
    h.zip_(h.sweep("a", [1, 2, 3]), h.sweep("b", [1, 2]))
  with pytest.raises(ValueError, match="'a'.*two combined sweeps"):
    h.product(h.sweep("a", [1]), h.sweep("a", [2]))
  with pytest.raises(ValueError, match="no values"):
    h.sweep("a", [])
  with pytest.raises(TypeError, match="cannot pass None"):
    h.to_flags({"a": None})
  with pytest.raises(FileNotFoundError):
    h.trials("configs/nope.py:tiny")
