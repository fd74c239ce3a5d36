"""Block-wise quantised storage for frozen Dense kernels (the QLoRA base).

A kernel float[*in, *out] is viewed as [I, *out] (I = prod(in)) and cut into blocks of
`block` consecutive input rows per output column, as bitsandbytes blocks a torch Linear
weight [out, in] along `in`. Each block stores its absmax as a float32 scale and its
values as codes:
  nf4   4-bit indices into the NormalFloat4 table (Dettmers et al. 2023, "QLoRA"), two per
        uint8 along I: codes uint8[I / 2, *out], scales float32[I / block, *out]
  int8  round(127 x / absmax): codes int8[I, *out], scales float32[I / block, *out]
Flattening the input dims keeps the sharding: splitting I into k contiguous chunks is
the same split as splitting the first input dim k ways, so codes and scales carry the
kernel's axis names with the input dims collapsed onto the first one.

Codes and scales are `QuantKernel` variables, not `nnx.Param`: no filter can ever make
them trainable. `matmul` dequantises them in the forward pass, one layer at a time, and
again in the backward pass: what it saves for the gradient is the codes, never the float
kernel (as bitsandbytes' 4-bit matmul saves its quantised state).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax import target

QTYPES = ("nf4", "int8")

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero, as
# published with QLoRA and used by bitsandbytes (so our codes mean the same values).
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


class QuantKernel(nnx.Variable):
  """Quantised codes or block scales of a frozen kernel (never trained)."""


def code_name(qtype: str) -> str:
  return f"kernel_{qtype}"


def check_shape(shape: tuple[int, ...], n_in: int, block: int, where: str) -> None:
  """Raises ValueError naming `where` if the kernel cannot be cut into whole blocks."""
  rows = math.prod(shape[:n_in])
  if block % 2 or rows % block:
    raise ValueError(f"{where}: input size {rows} (kernel {shape}) is not a multiple of the "
                     f"quantisation block {block} (which must be even)")


def quantize(kernel: jax.Array, n_in: int, qtype: str, block: int
             ) -> tuple[jax.Array, jax.Array]:
  """float[*in, *out] -> (codes, scales) as described in the module docstring."""
  out_shape = kernel.shape[n_in:]
  rows = math.prod(kernel.shape[:n_in])
  w = kernel.astype(jnp.float32).reshape(rows // block, block, *out_shape)
  absmax = jnp.abs(w).max(axis=1)  # [I / block, *out]
  scale = jnp.where(absmax > 0, absmax, 1.0)
  x = w / scale[:, None]  # in [-1, 1]
  if qtype == "int8":
    codes = jnp.round(x * 127).astype(jnp.int8).reshape(rows, *out_shape)
    return codes, absmax
  if qtype != "nf4":
    raise ValueError(f"unknown qtype {qtype!r}; expected one of {QTYPES}")
  # Nearest level: the levels are sorted, so count the midpoints below x.
  mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
  idx = (x[..., None] > mids).sum(-1).astype(jnp.uint8).reshape(rows // 2, 2, *out_shape)
  return idx[:, 0] | (idx[:, 1] << 4), absmax


def dequantize(codes: jax.Array, scales: jax.Array, n_in: int, in_shape: tuple[int, ...],
               qtype: str, dtype) -> jax.Array:
  """(codes, scales) -> kernel[*in_shape, *out] in `dtype`."""
  out_shape = codes.shape[1:]
  rows = math.prod(in_shape)
  blocks = scales.shape[0]
  if qtype == "nf4":
    lo, hi = codes & 0xF, codes >> 4
    idx = jnp.stack([lo, hi], axis=1).reshape(rows, *out_shape)
    x = jnp.asarray(NF4)[idx.astype(jnp.int32)]
  else:
    x = codes.astype(jnp.float32) / 127
  w = x.reshape(blocks, rows // blocks, *out_shape) * scales[:, None].astype(jnp.float32)
  return w.reshape(*in_shape, *out_shape).astype(dtype)


def axes(kernel_axes: tuple, n_in: int) -> tuple:
  """Logical axes of codes and scales: the input dims collapse onto the first one."""
  return (kernel_axes[0], *kernel_axes[n_in:])


def stored_params(name: str, size: int) -> int:
  """Parameters a stored leaf named `name` with `size` elements represents: an nf4 byte
  holds two, a scale none (it is overhead, counted in bytes only)."""
  if name == code_name("nf4"):
    return 2 * size
  if name == "kernel_scale":
    return 0
  return size


def _dequantize_after(dep: jax.Array, codes: jax.Array, scales: jax.Array, in_shape, qtype,
                      dtype) -> jax.Array:
  """dequantize, made to wait for `dep` (the layer's input, or in the backward pass its
  output's cotangent), so that the forward and backward dequantisations can neither run
  early nor be merged into one float kernel kept alive in between.

  An optimization barrier orders them on GPU and TPU. XLA on CPU strips barriers (and
  jax.checkpoint's) before it schedules: there phi2's QLoRA step dequantised every layer
  once for both passes, 16 GiB of temporaries. On CPU the order is a data dependency
  instead, dep's first value times zero added to the scales, which XLA cannot fold (0 * x
  is NaN for x = inf or NaN: a poisoned input poisons the output either way). Not used
  elsewhere: on a sharded `dep` that one value is a collective per layer and pass.
  """
  if target.current().platform == "cpu":
    scales = scales + (dep[(0,) * dep.ndim] * 0).astype(scales.dtype)
  else:
    _, codes, scales = jax.lax.optimization_barrier((dep, codes, scales))
  return dequantize(codes, scales, len(in_shape), in_shape, qtype, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def matmul(x: jax.Array, codes: jax.Array, scales: jax.Array, in_shape: tuple[int, ...],
           qtype: str) -> jax.Array:
  """x float[..., *in] . dequantize(codes, scales) -> float[..., *out], in x's dtype.

  The gradient reaches x only (codes and scales are frozen). The backward pass dequantises
  the kernel again once the output's cotangent exists, so neither pass holds more than
  the kernels of the layers it is working on.
  """
  return _forward(x, codes, scales, in_shape, qtype)[0]


def contract(x: jax.Array, kernel: jax.Array, n: int) -> jax.Array:
  """Contracts x's trailing n dims with kernel's leading n dims (Dense's matmul)."""
  return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))),
                                         ((), ())))


def _forward(x, codes, scales, in_shape, qtype):
  kernel = _dequantize_after(x, codes, scales, in_shape, qtype, x.dtype)
  return contract(x, kernel, len(in_shape)), (codes, scales)


def _backward(in_shape, qtype, residuals, g):
  codes, scales = residuals
  kernel = _dequantize_after(g, codes, scales, in_shape, qtype, g.dtype)
  n_in = len(in_shape)
  out_dims = tuple(range(n_in, kernel.ndim))
  dx = jax.lax.dot_general(g, kernel, ((tuple(range(g.ndim - len(out_dims), g.ndim)),
                                        out_dims), ((), ())))
  # Integer codes take float0 cotangents; the scales' zeros are never used (frozen).
  return dx, np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(scales)


matmul.defvjp(_forward, _backward)
