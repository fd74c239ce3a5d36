"""Lower a jitted function for CUDA or TPU on this CPU machine (no accelerator needed).

jax.export runs Pallas' Python-side lowering (Triton IR for GPU, Mosaic for TPU), which
catches unsupported ops and block shapes; the device compilers themselves run in the
deviceless compile tests (tests/targets, the CI step with jax[tpu] and jax[cuda12]).
"""

from unittest import mock

import jax
from jax._src.pallas.mosaic import tpu_info

from mm_jax import target

TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def export_for(platform: str, fn, *args, capability: tuple[int, int] | None = None):
  """Exports `fn(*args)` for `platform` ("cuda" | "tpu") with the compile target set to it
  (a v5e, or a GPU of `capability`: None is a GPU with no known compute capability)."""
  tgt = (target.Target("tpu", "TPU v5 lite") if platform == "tpu"
         else target.Target("gpu", "NVIDIA GPU", capability))
  # Mosaic TPU reads the chip generation for a few ops; pretend to be a v5e.
  patches = [mock.patch.object(tpu_info, "get_device_kind", lambda: "TPU v5 lite"),
             mock.patch.object(tpu_info, "get_num_device_cores", lambda: 1)]
  for p in patches:
    p.start()
  try:
    with target.use(tgt):
      return jax.export.export(jax.jit(fn), platforms=(platform,),
                               disabled_checks=[TRITON])(*args)
  finally:
    for p in patches:
      p.stop()
