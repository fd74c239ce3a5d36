"""Block-quantised kernel storage (mm_jax/models/quant.py) against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mm_jax.models import quant
from mm_jax.models.layers import Dense


def _reference(w: np.ndarray, n_in: int, qtype: str, block: int) -> np.ndarray:
  """Dequantised kernel by the textbook rule: per block of `block` input rows per output
  column, scale by absmax, snap to the nearest level (NF4 table or k/127)."""
  rows = int(np.prod(w.shape[:n_in]))
  x = w.reshape(rows // block, block, -1).astype(np.float64)
  absmax = np.abs(x).max(1, keepdims=True)
  y = x / np.where(absmax > 0, absmax, 1)
  if qtype == "nf4":
    levels = quant.NF4[np.abs(y[..., None] - quant.NF4).argmin(-1)]
  else:
    levels = np.round(y * 127) / 127
  return (levels * absmax).reshape(w.shape)


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("shape,n_in", [((128, 6), 1), ((64, 4, 8), 1), ((4, 32, 24), 2)])
def test_round_trip_matches_the_reference(qtype, shape, n_in):
  w = np.asarray(jax.random.normal(jax.random.key(len(shape)), shape)) * 0.02
  w[:64] = 0.0 if n_in == 1 else w[:64]  # an all-zero block must stay exactly zero
  codes, scales = quant.quantize(jnp.asarray(w), n_in, qtype, 64)
  rows = int(np.prod(shape[:n_in]))
  assert codes.shape == ((rows // 2 if qtype == "nf4" else rows), *shape[n_in:])
  assert codes.dtype == (jnp.uint8 if qtype == "nf4" else jnp.int8)
  assert scales.shape == (rows // 64, *shape[n_in:]) and scales.dtype == jnp.float32
  back = np.asarray(quant.dequantize(codes, scales, n_in, shape[:n_in], qtype, jnp.float32))
  np.testing.assert_allclose(back, _reference(w, n_in, qtype, 64), rtol=1e-6, atol=1e-9)


def test_nf4_levels_are_exact_and_packed_two_per_byte():
  levels = np.tile(quant.NF4, 4)[:, None] * 3.0  # each block holds every level, absmax 3
  codes, scales = quant.quantize(jnp.asarray(levels), 1, "nf4", 16)
  np.testing.assert_array_equal(np.asarray(scales), 3.0)
  np.testing.assert_array_equal(np.asarray(codes[:8, 0]),
                                [i | (i + 1) << 4 for i in range(0, 16, 2)])
  back = quant.dequantize(codes, scales, 1, (64,), "nf4", jnp.float32)
  np.testing.assert_array_equal(np.asarray(back), levels)


def test_block_must_divide_the_input():
  with pytest.raises(ValueError, match="decoder/layers/0/q: input size 80"):
    quant.check_shape((80, 8), 1, 64, "decoder/layers/0/q")


def test_quantised_dense_uses_the_dequantised_kernel():
  dense = Dense((64,), (4, 8), ("embed", "heads", "head_dim"), use_bias=True,
                rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 64))
  kernel = dense.kernel[...]
  dense.quantize_base("int8", 32)
  assert dense.kernel is None and dense.kernel_int8.shape == (64, 4, 8)
  names = {p[-1]: type(v) for p, v in nnx.to_flat_state(nnx.state(dense))}
  assert names["kernel_int8"] is quant.QuantKernel and names["kernel_scale"] is quant.QuantKernel
  want = jnp.einsum("btd,dnh->btnh", x, dense.base_kernel()) + dense.bias[...]
  np.testing.assert_allclose(np.asarray(dense(x)), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(dense.base_kernel() - kernel)).max() < np.abs(kernel).max() / 100


@pytest.mark.parametrize("qtype", quant.QTYPES)
@pytest.mark.parametrize("in_shape,out_shape", [((64,), (4, 8)), ((4, 32), (24,))])
def test_matmul_gradient_is_the_dequantised_kernels(qtype, in_shape, out_shape):
  """quant.matmul's own backward (dequantise again, contract with the cotangent) gives the
  gradient autodiff gives through the dequantised kernel."""
  w = jax.random.normal(jax.random.key(2), in_shape + out_shape) * 0.02
  codes, scales = quant.quantize(w, len(in_shape), qtype, 32)
  x = jax.random.normal(jax.random.key(3), (2, 3, *in_shape))
  t = jax.random.normal(jax.random.key(4), (2, 3, *out_shape))
  kernel = quant.dequantize(codes, scales, len(in_shape), in_shape, qtype, jnp.float32)
  n = len(in_shape)
  dims = ((tuple(range(2, 2 + n)), tuple(range(n))), ((), ()))
  plain = lambda x: (jax.lax.dot_general(x, kernel, dims) * t).sum()
  ours = jax.jit(lambda x: (quant.matmul(x, codes, scales, in_shape, qtype) * t).sum())
  np.testing.assert_allclose(float(ours(x)), float(plain(x)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.grad(ours)(x)), np.asarray(jax.grad(plain)(x)),
                             rtol=1e-5, atol=1e-6)
