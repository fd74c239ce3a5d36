"""Lower a jitted function for CUDA or TPU on this CPU machine (no accelerator needed).

jax.export runs Pallas' Python-side lowering (Triton IR for GPU, Mosaic for TPU), which
catches unsupported ops and block shapes; only the device compilers are not exercised.
"""

from unittest import mock

import jax
from jax._src.pallas.mosaic import tpu_info

TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def export_for(platform: str, fn, *args, modules=()):
  """Exports `fn(*args)` for `platform` ("cuda" | "tpu") as if running there."""
  name = "tpu" if platform == "tpu" else "gpu"
  patches = [mock.patch.object(m, "platform", lambda: name) for m in modules]
  # Mosaic TPU reads the chip generation for a few ops; pretend to be a v5e.
  patches += [mock.patch.object(tpu_info, "get_device_kind", lambda: "TPU v5 lite"),
              mock.patch.object(tpu_info, "get_num_device_cores", lambda: 1)]
  for p in patches:
    p.start()
  try:
    return jax.export.export(jax.jit(fn), platforms=(platform,), disabled_checks=[TRITON])(
        *args)
  finally:
    for p in patches:
      p.stop()
