"""The workdir before any compute: writable, and what its saved config.json says.

A run's record is `workdir/config.json`. A resume compares the config it was started with
against it: every difference is printed, and one that changes parameter shapes is
refused (recovery.py names the parameter and these keys).
"""

from __future__ import annotations

import json
import os
import uuid

import jax

from mm_jax import config as config_lib
from mm_jax import paths
from mm_jax.config import Config, ConfigError


def check_writable(workdir: str) -> None:
  """ConfigError in one line unless `workdir` is (or can be made) a writable directory.
  Tried for real (a probe file), because permission bits say nothing to root or about a
  read-only mount."""
  try:
    if paths.exists(workdir) and not paths.isdir(workdir):
      raise ConfigError(f"--workdir={workdir}: exists and is not a directory")
    paths.makedirs(workdir)
    probe = paths.join(workdir, f".write_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}")
    paths.write_text(probe, "ok")
    paths.remove(probe)
  except ImportError as e:  # a gs:// workdir without gcsfs
    raise ConfigError(f"--workdir={workdir}: {e}") from None
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: not writable ({e.strerror or e})") from None


def saved_config(workdir: str) -> dict | None:
  path = paths.join(workdir, "config.json")
  if not paths.exists(path):
    return None
  try:
    return json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: unreadable ({e}); delete it to resume with the config saved "
                      "in the newest checkpoint, or use a new --workdir to start over") from None


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def config_diff(saved: dict | None, cfg: Config) -> list[tuple[str, object, object]]:
  """[(key, saved value, value now)] for every field that differs."""
  if saved is None:
    return []
  old = _flat(saved)
  new = _flat(json.loads(json.dumps(config_lib.to_dict(cfg))))  # the form config.json has
  keys = sorted(set(old) | set(new))
  return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in keys
          if old.get(k, "<absent>") != new.get(k, "<absent>")]


def format_diff(diff: list[tuple[str, object, object]], limit: int = 8) -> str:
  items = [f"config.{k}: {old!r} -> {new!r}" for k, old, new in diff[:limit]]
  more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
  return "; ".join(items) + more


def write_config(cfg: Config, workdir: str) -> None:
  """config.json of the run, replaced atomically (a crash mid-write leaves the old one)."""
  if jax.process_index() != 0:
    return
  paths.makedirs(workdir)
  paths.write_text(paths.join(workdir, "config.json"),
                   json.dumps(config_lib.to_dict(cfg), indent=2))
