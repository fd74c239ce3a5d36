"""Test setup: 8 fake CPU devices (before JAX starts), float32 matmuls, shared configs."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from configs import llava, mimo  # noqa: E402
from mm_jax import config as config_lib  # noqa: E402


def tiny_config(**overrides) -> config_lib.Config:
  """The tiny preset with dotted overrides, e.g. tiny_config(**{"train.steps": 3})."""
  return _with_overrides(llava.get_config("tiny"), overrides)


def mimo_config(**overrides) -> config_lib.Config:
  """configs/mimo.py:tiny (video + audio) with dotted overrides."""
  return _with_overrides(mimo.get_config("tiny"), overrides)


def _with_overrides(cd, overrides) -> config_lib.Config:
  with cd.unlocked():
    for key, value in overrides.items():
      node = cd
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config_lib.from_config_dict(cd)


@pytest.fixture
def tiny():
  return tiny_config


def pytest_collection_modifyitems(config, items):
  """`gpu` tests need a CUDA device: skipped with that reason elsewhere, never silently."""
  if jax.default_backend() == "gpu":
    return
  reason = pytest.mark.skip(reason=f"needs a GPU (backend here: {jax.default_backend()})")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(reason)
