"""The ONE place for version-sensitive Pallas imports (jax 0.10 on CPU CI, 0.11 on GPU).

Kernels import `pl`, `pltpu`, `plgpu`, compiler params and `interpret_for` from here only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl  # noqa: F401  (re-exported)
from jax.experimental.pallas import tpu as pltpu  # noqa: F401

from mm_jax import target

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


def interpret_for(interpret: bool | None) -> bool:
  """`interpret=None` means: interpret when the compile target is CPU, compile for GPU and
  TPU (mm_jax/target.py; never the host's backend)."""
  return target.current().interpret if interpret is None else interpret


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """float32-accumulated matmul inside kernels (pl.dot moved to pallas.triton in 0.10;
  lax.dot_general lowers on Triton, Mosaic TPU and the interpreter alike).

  16-bit operands get the default precision explicitly: under
  `jax_default_matmul_precision=highest` Mosaic TPU asks for an fp32 contraction of bf16
  operands, which v5e's compiler rejects ("Bad lhs type"); it gains nothing on 16-bit inputs.
  """
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  precision = jax.lax.Precision.DEFAULT if jnp.dtype(a.dtype).itemsize < 4 else None
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- Mosaic GPU
# The plgpu API changes between releases; the Hopper attention kernels use only the names
# below and fall back to Triton (with the reason logged) when one is missing.

try:
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - jax without Mosaic GPU
  plgpu = None

MGPU_NAMES = ("kernel", "Barrier", "SMEM", "ACC", "Layout", "TilingTransform",
              "SwizzleTransform", "copy_gmem_to_smem", "copy_smem_to_gmem", "commit_smem",
              "wait_smem_to_gmem", "barrier_wait", "barrier_arrive", "wgmma", "transpose_ref",
              "layout_cast", "broadcasted_iota", "load", "set_max_registers", "CompilerParams")


def mosaic_gpu_missing() -> str | None:
  """Why this jax cannot build the Mosaic GPU attention kernels (None: it can)."""
  if plgpu is None:
    return f"jax {jax.__version__} has no jax.experimental.pallas.mosaic_gpu"
  missing = [name for name in MGPU_NAMES if not hasattr(plgpu, name)]
  if missing:
    return f"jax {jax.__version__}: plgpu lacks {', '.join(missing)}"
  return None


def cuda_runtime_version() -> int | None:
  """CUDA runtime version of the installed jax CUDA plugin (12090 = 12.9.0), whose ptxas
  compiles Mosaic GPU kernels; None without the plugin."""
  try:
    from jax._src.lib import cuda_versions
  except ImportError:  # pragma: no cover
    return None
  return cuda_versions.cuda_runtime_get_version() if cuda_versions is not None else None


# jax's own Mosaic GPU attention refuses causal masking for these runtimes: their ptxas
# miscompiles it (jax/experimental/pallas/ops/gpu/attention_mgpu.py). Ours is guarded alike.
PTXAS_CAUSAL_BUG = (12080, 12091)


def mgpu_causal_refused(causal: bool) -> str | None:
  """Why causal Mosaic GPU kernels must not be compiled with this CUDA (None: they may)."""
  version = cuda_runtime_version()
  if causal and version is not None and PTXAS_CAUSAL_BUG[0] <= version < PTXAS_CAUSAL_BUG[1]:
    return (f"CUDA {version // 1000}.{version % 1000 // 10}: ptxas miscompiles causal "
            "masking in Mosaic GPU kernels (12.8.0 to 12.9.0; jax refuses it too)")
  return None


def mgpu_params():
  # approx_math: exp2 and division use the fast PTX approximations (ample for bf16 P).
  return plgpu.CompilerParams(approx_math=True)


def mgpu_interpret_params():
  """Mosaic GPU interpreter settings (public in jax 0.12; private before)."""
  if hasattr(plgpu, "InterpretParams"):
    return plgpu.InterpretParams()
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

  return InterpretGPUParams()
