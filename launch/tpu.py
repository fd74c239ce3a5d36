"""Cloud TPU slice names -> chips and default topologies, for every launcher.

The facts live in mm_jax/accelerators.py, the one table that dry runs (--target), kernels
and launch/ read. It imports nothing beyond the standard library, so the XManager
environment (which has no jax) shares it with the GKE renderer.
"""

from mm_jax.accelerators import (  # noqa: F401  (re-exported for launch/)
  CHIPS_PER_HOST,
  GENERATIONS,
  SINGLE_HOST_MAX_CHIPS_2D,
  TOPOLOGIES,
  default_topology,
  topology_chips,
)
from mm_jax.accelerators import tpu_chips as chips  # noqa: F401
