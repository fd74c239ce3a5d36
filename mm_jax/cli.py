"""What main.py needs from its command line beyond the flags: the config keys the user gave,
one-line explanations of start-up failures, and the resolved config as text.

ml_collections reads `--config.*` overrides while the flag is defined and parsed, and its
failures (a typo'd key, a missing file, a get_config that raises) come as tracebacks whose
last line rarely names the key. `explain` finds the cause again from argv itself: the
config file, its argument, then each override key against the loaded ConfigDict.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

DEFAULT_CONFIG = "configs/llava.py:tiny"
_PREFIXES = ("--config.", "--noconfig.", "-config.", "-noconfig.")


def explicit_keys(argv: Sequence[str]) -> tuple[str, ...]:
  """Config keys given on the command line: `--config.optim.lr=1e-4` -> "optim.lr"
  (also `--config.x v`, `--noconfig.x`), in order, once each."""
  keys = []
  for a in argv:
    for prefix in _PREFIXES:
      if a.startswith(prefix):
        keys.append(a[len(prefix):].split("=", 1)[0])
  return tuple(dict.fromkeys(keys))


def config_spec(argv: Sequence[str]) -> str:
  """The --config value (the last one wins, as with absl), else the default."""
  spec = DEFAULT_CONFIG
  for i, a in enumerate(argv):
    for name in ("--config", "-config"):
      if a.startswith(name + "="):
        spec = a.split("=", 1)[1]
      elif a == name and i + 1 < len(argv):
        spec = argv[i + 1]
  return spec


def _load(spec: str) -> Any:
  """get_config(arg) of a `path[:arg]` spec, as ml_collections calls it."""
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise _Explained(f"config error: --config={spec}: no file {path} (a config file and "
                     f"its argument, e.g. --config={DEFAULT_CONFIG})")
  module_spec = importlib.util.spec_from_file_location("_mm_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported
    raise _Explained(f"config error: --config={spec}: {path} fails to import: "
                     f"{type(e).__name__}: {_first_line(e)}") from None
  if not hasattr(module, "get_config"):
    raise _Explained(f"config error: --config={spec}: {path} has no get_config()")
  try:
    return module.get_config(arg) if sep else module.get_config()
  except Exception as e:  # noqa: BLE001
    raise _Explained(f"config error: --config={spec}: {_first_line(e)}") from None


class _Explained(Exception):
  pass


def _first_line(e: BaseException) -> str:
  text = str(e.args[0]) if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
  return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _check_key(cd: Any, key: str) -> str | None:
  """None if `key` exists in the ConfigDict, else the one-line error naming it."""
  node, walked = cd, "config"
  for part in key.split("."):
    children = list(node.keys()) if hasattr(node, "keys") else []
    if part not in children:
      if not children:
        return f"config error: config.{key}: {walked} is a value, not a group of keys"
      close = difflib.get_close_matches(part, children, n=1)
      hint = f"did you mean {walked}.{close[0]}? " if close else ""
      return (f"config error: config.{key}: unknown key; {hint}(keys of {walked}: "
              f"{', '.join(sorted(children))}; --print_config lists them all)")
    node, walked = node[part], f"{walked}.{part}"
  return None


def explain(argv: Sequence[str], error: BaseException) -> str:
  """One line saying why defining or parsing the flags failed, naming the key or file."""
  spec = config_spec(argv)
  try:
    cd = _load(spec)
  except _Explained as e:
    return str(e)
  for key in explicit_keys(argv):
    message = _check_key(cd, key)
    if message:
      return message
  from absl import flags

  if isinstance(error, flags.Error):
    # e.g. "flag --config.optim.lr=abc: could not convert string to float: 'abc'"
    return f"flag error: {_first_line(error)}"
  return f"error: {type(error).__name__}: {_first_line(error)}"


def format_config(config: Any) -> str:
  """A typed Config as `key = value` lines in field order (what --print_config shows):
  each line's key is what `--config.<key>=` overrides."""
  lines = []

  def walk(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
      value = getattr(obj, f.name)
      if dataclasses.is_dataclass(value):
        walk(value, f"{prefix}{f.name}.")
      else:
        lines.append(f"{prefix}{f.name} = {value!r}")

  walk(config, "")
  return "\n".join(lines)
