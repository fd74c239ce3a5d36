"""The ONE place for version-sensitive Pallas imports (jax 0.10 on CPU CI, 0.11 on GPU).

Kernels import `pl`, `pltpu`, `triton_params` and `interpret_for` from here only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl  # noqa: F401  (re-exported)
from jax.experimental.pallas import tpu as pltpu  # noqa: F401

try:  # jax >= 0.6: Triton compiler params live in pallas.triton.
  from jax.experimental.pallas import triton as _pltriton

  def triton_params(num_warps: int = 4, num_stages: int = 2):
    """Selects Pallas' Triton lowering on GPU (Mosaic GPU is the default since 0.9)."""
    return _pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
except ImportError:  # pragma: no cover - very old jax
  from jax.experimental.pallas import gpu as _plgpu

  def triton_params(num_warps: int = 4, num_stages: int = 2):
    return _plgpu.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(*semantics: str):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def platform() -> str:
  return jax.default_backend()


def interpret_for(interpret: bool | None) -> bool:
  """`interpret=None` means: interpret on CPU, compile on GPU and TPU."""
  return platform() == "cpu" if interpret is None else interpret


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """float32-accumulated matmul inside kernels (pl.dot moved to pallas.triton in 0.10;
  lax.dot_general lowers on Triton, Mosaic TPU and the interpreter alike)."""
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
