"""Every Pallas kernel, forward and backward, compiled by each target's own compiler.

TPU v5e, v5p, v6e (Mosaic TPU); H100 (sm_90: Mosaic GPU where it applies, Triton else) and
A100 (sm_80: Triton). Each case asserts the kernels became that backend's custom calls in
the compiled executable: compiled, not interpreted (a CPU target has none).
"""

import jax
import jax.numpy as jnp
import pytest
from deviceless import devices
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mm_jax.kernels import attention as fa
from mm_jax.kernels import compat, merge
from mm_jax.train.compile_check import kernel_calls

TPUS = ("v5e-4", "v5p-8", "v6e-4")
FLASH = ("flash_attention_fwd", "flash_attention_dkv", "flash_attention_dq")
MGPU = ("attention_mgpu_fwd", "attention_mgpu_dkv", "attention_mgpu_dq")
# (batch, T, query heads, kv heads, head dim, causal, segment ids): MHA and GQA, ragged T.
ATTENTION = {
    "mha-h64-causal-packed": (2, 256, 4, 4, 64, True, True),
    "gqa4-h128-causal-ragged": (1, 200, 8, 2, 128, True, False),
    "gqa4-h80-packed-ragged": (2, 136, 4, 1, 80, False, True),
    "gqa2-h128-packed": (1, 256, 4, 2, 128, False, True),
}


def _compile(name, fn, *shapes):
  mesh = jax.sharding.Mesh(devices(name)[:1], ("x",))
  args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P())) for s, d in shapes]
  with jax.set_mesh(mesh):
    return kernel_calls(jax.jit(fn).lower(*args).compile().as_text())


def _attention(name, case, dtype):
  b, t, n, k, h, causal, packed = ATTENTION[case]

  def loss(q, kk, v, seg):
    out = fa.flash_attention(q, kk, v, segment_ids=seg if packed else None, causal=causal)
    return (out.astype(jnp.float32) ** 2).sum()

  return _compile(name, jax.grad(loss, argnums=(0, 1, 2)), ((b, t, n, h), dtype),
                  ((b, t, k, h), dtype), ((b, t, k, h), dtype), ((b, t), jnp.int32))


def _merge(name, dtype, d=256):
  def loss(text, media, index):
    return (merge.merge_tokens(text, media, index, impl="pallas").astype(jnp.float32) ** 2).sum()

  return _compile(name, jax.grad(loss, argnums=(0, 1)), ((2, 64, d), dtype), ((20, d), dtype),
                  ((2, 64), jnp.int32))


def _backends(calls, names):
  return {backend for (kernel, backend), n in calls.items() if kernel in names and n}


@pytest.mark.parametrize("case", ATTENTION)
@pytest.mark.parametrize("name", TPUS)
def test_attention_compiles_for_tpu(name, case):
  calls = _attention(name, case, jnp.bfloat16)
  assert {k for k, _ in calls} == set(FLASH) and _backends(calls, FLASH) == {"Mosaic TPU"}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", TPUS)
def test_merge_compiles_for_tpu(name, dtype):
  """The merge moves 16-bit rows as pairs on TPU (a DMA cannot address half a word)."""
  calls = _merge(name, dtype)
  assert calls == {("merge_put_rows", "Mosaic TPU"): 2, ("merge_take_rows", "Mosaic TPU"): 1}


def _hopper_backend(case) -> str:
  *_, h, causal, _ = ATTENTION[case]
  if h not in (64, 128, 256) or compat.mgpu_causal_refused(causal):
    return "Triton"
  return "Mosaic GPU"


@pytest.mark.parametrize("case", ATTENTION)
def test_attention_compiles_for_h100(case):
  """bf16 at H 64/128 goes to the Mosaic GPU kernels (wgmma, TMA) unless this CUDA's ptxas
  miscompiles causal masking; H 80 and refused cases to Triton. Through ptxas for sm_90a."""
  calls = _attention("h100x1", case, jnp.bfloat16)
  backend = _hopper_backend(case)
  names = MGPU if backend == "Mosaic GPU" else FLASH
  assert {k for k, _ in calls} == set(names) and _backends(calls, names) == {backend}


@pytest.mark.parametrize("case", ["mha-h64-causal-packed", "gqa4-h80-packed-ragged"])
@pytest.mark.parametrize("name,dtype", [("h100x1", jnp.float32), ("a100x1", jnp.bfloat16),
                                        ("a100x1", jnp.float32)])
def test_attention_compiles_through_triton(name, dtype, case):
  """float32 (wgmma multiplies 16-bit operands only) and sm_80 run the Triton kernels."""
  calls = _attention(name, case, dtype)
  assert {k for k, _ in calls} == set(FLASH) and _backends(calls, FLASH) == {"Triton"}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", ["h100x1", "a100x1"])
def test_merge_compiles_for_gpu(name, dtype):
  calls = _merge(name, dtype, d=5120)  # 13B's width: 5 column chunks of 1024
  assert calls == {("merge_put_rows", "Triton"): 2, ("merge_take_rows", "Triton"): 1}
