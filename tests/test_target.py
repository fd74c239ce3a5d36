"""The compile target comes from the mesh (or `use`), never from the host's backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_jax import sharding, target
from mm_jax.config import MeshConfig
from mm_jax.kernels import attention as fa
from mm_jax.kernels import merge

H100 = target.Target("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
V5P = target.Target("tpu", "TPU v5")


def test_current_follows_use_then_the_mesh_then_the_host():
  assert target.current() == target.local() and target.current().platform == "cpu"
  with target.use(V5P):
    assert target.current() == V5P and not target.current().interpret
    with target.use(H100):
      assert target.current().capability == (9, 0)
    assert target.current() == V5P
  mesh = sharding.make_mesh(MeshConfig(1, 2, 1), jax.devices()[:2])
  seen = []

  @jax.jit
  def traced(x):
    seen.append(target.current())  # inside a trace: from the abstract mesh's device
    return x

  with jax.set_mesh(mesh):
    traced(jnp.zeros(2))
  assert seen == [target.Target.of_mesh(mesh)] and seen[0].interpret


def test_facts_come_from_the_chip_table():
  assert V5P.peak_flops == 459e12 and V5P.hbm_bytes == 95 * 2**30 and V5P.name == "v5p"
  assert H100.name == "h100 (sm_90)" and H100.peak_flops == 989e12
  cpu = target.local()
  assert cpu.peak_flops is None and cpu.hbm_bytes is None and cpu.interpret


def test_a_gpu_target_compiles_kernels_a_cpu_target_interprets_them():
  """The same call traces to an interpreted pallas_call for a CPU target and to a compiled
  one for a GPU target, on this CPU host."""
  q = jnp.zeros((1, 64, 2, 64))
  jaxpr = lambda: str(jax.make_jaxpr(lambda q: fa.flash_attention(q, q, q))(q))
  assert "interpret=True" in jaxpr() and "interpret=False" not in jaxpr()
  with target.use(target.Target("gpu", "NVIDIA A100-SXM4-80GB", (8, 0))):
    assert "interpret=False" in jaxpr() and "interpret=True" not in jaxpr()


SPREAD = [1, 2, 3, 4, 7, 10, 11, 24, 25, 31, 32, 33, 47]  # both rows, pairs split and shared
ODD = [0, 1, 2, 3, 4, 7, 10, 11, 15, 16, 17, 20, 24]  # 1 x 25 rows: the last has no pair


@pytest.mark.parametrize("dtype,b,t,positions", [(jnp.bfloat16, 2, 24, SPREAD),
                                                 (jnp.float32, 2, 24, SPREAD),
                                                 (jnp.bfloat16, 1, 25, ODD)])
def test_tpu_merge_kernels_match_the_reference_in_the_tpu_interpreter(dtype, b, t, positions):
  """The TPU merge (DMAs; 16-bit rows moved as pairs, read-modify-write) run by Pallas' TPU
  interpreter with race detection: forward and both gradients equal XLA's exactly, with
  neighbouring media rows sharing a pair, a pair split between text and media, and rows of
  both batch rows."""
  from jax.experimental.pallas import tpu as pltpu

  d, m = 256, len(positions)
  keys = jax.random.split(jax.random.key(0), 2)
  text = jax.random.normal(keys[0], (b, t, d)).astype(dtype)
  media = jax.random.normal(keys[1], (m, d)).astype(dtype)
  index = np.full((b, t), -1, np.int32)
  for k, p in enumerate(positions):
    index.flat[p] = k
  index = jnp.asarray(index)
  params = pltpu.InterpretParams(detect_races=True)
  ours = lambda x, y: merge.merge_tokens(x, y, index, impl="pallas", interpret=params)
  ref = lambda x, y: merge.merge_tokens_reference(x, y, index)
  loss = lambda f: lambda x, y: (f(x, y).astype(jnp.float32) ** 2).sum()
  np.testing.assert_array_equal(ours(text, media), ref(text, media))
  for a, r in zip(jax.grad(loss(ours), (0, 1))(text, media),
                  jax.grad(loss(ref), (0, 1))(text, media), strict=True):
    np.testing.assert_array_equal(a, r)
