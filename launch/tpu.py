"""Cloud TPU slice names -> chips and default topologies: one table for every launcher.

Imports nothing beyond the standard library, so the XManager environment (which has no jax)
shares it with the GKE renderer.
"""

# generation -> (GKE's cloud.google.com/gke-tpu-accelerator value, TensorCores per chip that
# the name counts, topology rank). v5p names count TensorCores (v5p-128 is 64 chips); v5e and
# v6e count chips.
GENERATIONS = {
  "v5e": ("tpu-v5-lite-podslice", 1, 2),
  "v6e": ("tpu-v6e-slice", 1, 2),
  "v5p": ("tpu-v5p-slice", 2, 3),
}
# Chip count -> GKE's default topology, from GKE's TPU tables (other shapes: an explicit one).
TOPOLOGIES = {
  2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
      256: "16x16"},
  3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
      256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
}
CHIPS_PER_HOST = 4  # every multi-host v5e/v5p/v6e slice: 4 chips per VM
SINGLE_HOST_MAX_CHIPS_2D = 8  # v5e/v6e slices up to 8 chips are one VM with all of them


def chips(generation: str, count: int) -> int:
  """The chips in `<generation>-<count>`."""
  per_chip = GENERATIONS[generation][1]
  if count % per_chip:
    raise ValueError(f"{generation}-{count}: {generation} names count TensorCores, "
                     f"{per_chip} per chip")
  return count // per_chip


def default_topology(generation: str, n_chips: int) -> str:
  table = TOPOLOGIES[GENERATIONS[generation][2]]
  if n_chips not in table:
    per_chip = GENERATIONS[generation][1]
    known = ", ".join(f"{generation}-{c * per_chip}" for c in table)
    raise ValueError(f"{generation}: {n_chips} chips has no standard topology (known: {known})")
  return table[n_chips]


def topology_chips(topology: str) -> int:
  n = 1
  for d in topology.split("x"):
    n *= int(d)
  return n
