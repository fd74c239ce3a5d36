"""Test setup: 8 fake CPU devices (before JAX starts), float32 matmuls, shared configs."""

import importlib.util
import os
import shutil
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the session, shared with the main.py processes tests start:
# many tests compile the same tiny step, and compiling dominates their time on 2 cores.
# A fresh folder per session, so no test ever runs an executable built by another version.
# pytest-xdist's workers inherit the controller's folder (made here before they start).
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mm_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

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


# The files that take minutes on 2 cores, longest first. pytest-xdist (--dist loadfile)
# hands out files in collection order, so starting these first keeps one worker from being
# left with a long file at the end while the other idles.
SLOW_FILES = ("launch/test_local.py", "train/test_sharding.py", "test_docs_run.py",
              "test_main.py", "train/test_faults.py", "train/test_lora.py", "test_bench.py",
              "train/test_preemption.py", "train/test_checkpoint.py", "train/test_step.py")


def _slow_rank(item) -> int:
  path = item.nodeid.split("::")[0].removeprefix("tests/")
  return SLOW_FILES.index(path) if path in SLOW_FILES else len(SLOW_FILES)


def pytest_collection_modifyitems(config, items):
  """Slow files first (above); `gpu` tests need a CUDA device: skipped with that reason
  elsewhere, never silently."""
  items.sort(key=_slow_rank)  # stable: each file keeps its own order
  if jax.default_backend() == "gpu":
    return
  reason = pytest.mark.skip(reason=f"needs a GPU (backend here: {jax.default_backend()})")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(reason)

# tests/launch/xm runs only where xmanager imports (.venv-xm: launch/requirements-xm.txt),
# with this file left out: .venv-xm/bin/python -m pytest -q --noconftest tests/launch/xm
# (there a missing xmanager is an import error, not a skip). xmanager pins protobuf<7, so
# the main environment never has it. (A conftest.py in that folder would shadow this one's
# module name, `conftest`, for the tests that import tiny_config.)
collect_ignore_glob = [] if importlib.util.find_spec("xmanager") else ["launch/xm/*"]


def pytest_sessionfinish(session, exitstatus):
  if _CACHE:  # only the process that made it: the controller, once every worker is done
    shutil.rmtree(_CACHE, ignore_errors=True)
