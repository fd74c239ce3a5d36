"""Deviceless compiles with the real TPU and GPU compilers (mm_jax/aot.py): what the tests
here import first (a module, not a conftest: tests import the root conftest by name).

These tests need `jax[tpu]` and `jax[cuda12]` at the project's jax version, which the test
install leaves out (several GB): .ci/run runs them in their own venv, .venv-targets. Without
the compilers each test is skipped with the pip command that adds them.
"""

import importlib.util
import os

import jax
import pytest

from mm_jax import accelerators, aot

# libtpu reads these when the backends start, which happens after collection; a machine's
# own TPU_ACCELERATOR_TYPE is only a default, every topology is built explicitly. A session
# on a real accelerator (JAX_PLATFORMS=cuda, bench/gpu.sh) leaves them alone and skips.
DEVICELESS = os.environ.get("JAX_PLATFORMS", "cpu") == "cpu"
if DEVICELESS:
  aot.prepare(accelerators.machine("v5p-8"))

HAVE_TPU = importlib.util.find_spec("libtpu") is not None
HAVE_CUDA = importlib.util.find_spec("jax_cuda12_plugin") is not None or (
    importlib.util.find_spec("jax_cuda13_plugin") is not None)


def need(platform: str) -> None:
  if not DEVICELESS:
    pytest.skip("deviceless compiles run with JAX_PLATFORMS=cpu")
  have = HAVE_TPU if platform == "tpu" else HAVE_CUDA
  if not have:
    extra = "tpu" if platform == "tpu" else "cuda12"
    pytest.skip(f"needs the {platform.upper()} compiler: pip install "
                f"'jax[{extra}]=={jax.__version__}' (.ci/run's .venv-targets has it)")


def devices(name: str, **kw) -> list:
  machine = accelerators.machine(name, **kw)
  need(machine.chip.platform)
  return aot.devices(machine)
