"""Hyperparameter sweeps as plain lists of trials, in big_vision's style.

A trial is a dict of dotted config keys to values, e.g. {"optim.lr": 1e-3}. A config file
may define `get_sweep(arg, h)`: `arg` is what follows the colon (as for `get_config`), `h` is
this module, so the config file builds its sweep from `h.sweep`, `h.product` and `h.zip_`
without importing anything beyond ml_collections. `trials()` calls that hook; `to_flags()`
turns one trial into main.py's argv, which config_flags parses back into the same values.
"""

import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Any

Trial = dict[str, Any]


def sweep(key: str, values) -> list[Trial]:
  """One trial per value of one key."""
  values = list(values)
  if not values:
    raise ValueError(f"sweep({key!r}): no values")
  return [{key: v} for v in values]


def product(*sweeps: list[Trial]) -> list[Trial]:
  """Every combination, the last sweep varying fastest."""
  return [_merge(combo) for combo in itertools.product(*sweeps)]


def zip_(*sweeps: list[Trial]) -> list[Trial]:
  """The i-th trials of every sweep together; all sweeps must be equally long."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f"zip_: sweeps of unequal lengths {lengths}")
  return [_merge(combo) for combo in zip(*sweeps, strict=True)]


def _merge(trials: tuple[Trial, ...]) -> Trial:
  merged: Trial = {}
  for t in trials:
    clash = set(merged) & set(t)
    if clash:
      raise ValueError(f"sweep: key(s) {sorted(clash)} set by two combined sweeps")
    merged.update(t)
  return merged


def load_config_module(config: str):
  """Imports `path` of `path[:arg]` as config_flags does: from its file, not a package."""
  path = Path(config.split(":", 1)[0])
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} not found")
  spec = importlib.util.spec_from_file_location(f"_sweep_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  # Config files import their siblings as `configs.<name>`, as main.py run from the repo
  # root allows: make the folder above the file's folder importable too (last, shadowing
  # nothing).
  root = str(path.resolve().parent.parent)
  if root not in sys.path:
    sys.path.append(root)
  spec.loader.exec_module(module)
  return module


def trials(config: str) -> list[Trial]:
  """The trials of `path[:arg]`'s `get_sweep(arg, h)`; one empty trial without that hook."""
  module = load_config_module(config)
  hook = getattr(module, "get_sweep", None)
  if hook is None:
    return [{}]
  arg = config.split(":", 1)[1] if ":" in config else None
  result = list(hook(arg, sys.modules[__name__]))
  for t in result:
    if not isinstance(t, dict):
      raise TypeError(f"{config}: get_sweep must return dicts, got {t!r}")
  return result


def to_flags(trial: Trial, config: str | None = None) -> list[str]:
  """main.py argv for `trial`: `--config=<config>` first (when given), then one per key."""
  argv = [f"--config={config}"] if config is not None else []
  return argv + [override_flag(k, v) for k, v in trial.items()]


def override_flag(key: str, value) -> str:
  """One `--config.<key>` flag that ml_collections' config_flags parses back to `value`."""
  text = flag_value(value)
  if isinstance(text, bool):  # absl's `--config.k` / `--noconfig.k`
    return f"--config.{key}" if text else f"--noconfig.{key}"
  return f"--config.{key}={text}"


def flag_value(value) -> bool | str:
  """`value` as the text after `--config.<key>=` (booleans stay booleans: no `=` form).

  Tuples (and lists, which config_flags only accepts into tuple fields) become a Python
  literal, `('image', 'video')`, which it reads with ast.literal_eval: the unquoted
  `(image,video)` would parse as the 1-tuple of the string "(image,video)".
  """
  if isinstance(value, bool):
    return value
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, str):
    return value
  raise TypeError(f"sweep: cannot pass {value!r} ({type(value).__name__}) as a flag")
