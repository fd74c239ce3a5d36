"""mm_jax.train.state: random initialisation in groups of leaves (CPU, big states)."""

import jax
import numpy as np
from conftest import tiny_config

from mm_jax import sharding
from mm_jax.train import state


def test_grouped_init_gives_the_same_bits_in_the_same_shardings(monkeypatch):
  cfg = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  mesh = sharding.make_mesh(cfg.mesh)
  built = state.build(cfg, mesh)
  whole = state.random_init(built)  # under the threshold: one jit
  monkeypatch.setattr(state, "_CPU_INIT_GROUP_BYTES", 256 << 10)  # of 1.3 MB a device
  calls = []
  real_jit = jax.jit
  monkeypatch.setattr(jax, "jit", lambda *a, **k: calls.append(1) or real_jit(*a, **k))
  grouped = state.random_init(built)
  assert len(calls) >= 4  # it really split the state
  for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(whole),
                             jax.tree.leaves(grouped), jax.tree.leaves(built.shardings),
                             strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    assert b.sharding.is_equivalent_to(s, b.ndim), path
