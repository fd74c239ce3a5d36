"""Small NNX building blocks shared by the towers and the decoder.

Every parameter carries `logical_axes` metadata (names from the table in
`mm_jax/sharding.py`); model code never names mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.models import quant


def next_key(rngs: nnx.Rngs) -> jax.Array:
  """The key `rngs.params()` gives, the same bits, at a constant cost while tracing.

  `rngs.params()` stores the incremented count with `count[...] = ...`, and for a full-index
  store flax compares `getattr(new, "sharding", None)`: on a tracer that builds an error
  message by walking every equation traced so far, which made construction under
  `jax.eval_shape` quadratic in the model's size (phi2's QLoRA `--dry_run` test: 81 s, 17 s
  with this). `set_value` without an index replaces the value directly.
  """
  stream = rngs.params
  count = stream.count.get_value()
  key = jax.random.fold_in(stream.key.get_value(), count)
  stream.count.set_value(count + 1)
  return key


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(next_key(rngs), tuple(shape), dtype), logical_axes=tuple(axes))


class Dense(nnx.Module):
  """y = x . W (+ b), contracting x's trailing `in_shape` dims into `out_shape` dims.

  kernel float[*in_shape, *out_shape] with `axes` naming every kernel dim; e.g. the query
  projection is Dense((D,), (N, H), ("embed", "heads", "head_dim")): "BTD,DNH->BTNH".

  With a LoRA adapter (`add_lora`, applied by `mm_jax.models.lora` after construction):
  y = x . W + (alpha / r) (drop(x) . A) . B,
  A float[*in_shape, R], B float[R, *out_shape]; `drop` is inverted dropout of rate
  `lora_dropout`, active only while `lora_key` holds a key (the train step sets it).
  After `quantize_base` the kernel is stored as block-quantised codes and scales
  (`mm_jax.models.quant`) and dequantised at each call.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               axes: Sequence[str | None], *, use_bias: bool, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, std: float | None = None):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    fan_in = math.prod(in_shape)
    init = jax.nn.initializers.normal(std if std is not None else fan_in**-0.5)
    self.kernel = param(rngs, init, in_shape + out_shape, axes, param_dtype)
    self.bias = (param(rngs, jax.nn.initializers.zeros, out_shape, axes[len(in_shape):],
                       param_dtype) if use_bias else None)
    self.n_in = len(in_shape)
    self.dtype = dtype
    # Data attributes even while None: `add_lora` may fill them after construction.
    self.lora_a: nnx.LoRAParam | None = nnx.data(None)
    self.lora_b: nnx.LoRAParam | None = nnx.data(None)
    self.lora_scale = 0.0
    self.lora_dropout = 0.0
    self.lora_key: jax.Array | None = nnx.data(None)
    self.in_shape, self.axes = in_shape, tuple(axes)
    self.qtype: str | None = None  # set by quantize_base

  def add_lora(self, rank: int, alpha: float, rngs: nnx.Rngs, dropout: float = 0.0) -> None:
    """Adds a rank-`rank` adapter: A ~ N(0, 1/fan_in), B = 0, so the output is unchanged
    until B trains. Adapters are `nnx.LoRAParam`s (a `Param` subclass: filters can pick
    them) with logical axes A (*in_axes, None), B (None, *out_axes): sharded like the
    kernel's input and output dims, the rank dim replicated."""
    kernel = self.kernel
    axes = kernel.get_metadata()["logical_axes"]
    shape, n = kernel.shape, self.n_in
    fan_in = math.prod(shape[:n])
    a = jax.nn.initializers.normal(fan_in**-0.5)(next_key(rngs), (*shape[:n], rank), kernel.dtype)
    self.lora_a = nnx.LoRAParam(a, logical_axes=(*axes[:n], None))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, *shape[n:]), kernel.dtype),
                                logical_axes=(None, *axes[n:]))
    self.lora_scale = alpha / rank
    self.lora_dropout = dropout

  def quantize_base(self, qtype: str, block: int, where: str = "Dense") -> None:
    """Replaces the kernel by block-quantised codes and scales (frozen for good)."""
    kernel = self.kernel
    quant.check_shape(kernel.shape, self.n_in, block, where)
    names = quant.axes(self.axes, self.n_in)
    codes, scales = quant.quantize(kernel[...], self.n_in, qtype, block)
    setattr(self, quant.code_name(qtype), quant.QuantKernel(codes, logical_axes=names))
    self.kernel_scale = quant.QuantKernel(scales, logical_axes=names)
    self.kernel = nnx.data(None)
    self.qtype = qtype

  def base_kernel(self) -> jax.Array:
    """The kernel float[*in, *out] in the compute dtype (dequantised if stored quantised)."""
    if self.qtype is None:
      return self.kernel[...].astype(self.dtype)
    codes, scales = getattr(self, quant.code_name(self.qtype))[...], self.kernel_scale[...]
    return quant.dequantize(codes, scales, self.n_in, self.in_shape, self.qtype, self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    n = self.n_in
    x = x.astype(self.dtype)
    if self.qtype is None:
      y = quant.contract(x, self.kernel[...].astype(self.dtype), n)
    else:
      codes = getattr(self, quant.code_name(self.qtype))[...]
      y = quant.matmul(x, codes, self.kernel_scale[...], self.in_shape, self.qtype)
    if self.lora_a is not None:
      if self.lora_dropout and self.lora_key is not None:
        keep = jax.random.bernoulli(self.lora_key, 1.0 - self.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(self.dtype)
      # Two skinny matmuls, never W + A.B: the dense delta would cost a kernel-sized buffer
      # (and its gradient) per layer.
      xa = quant.contract(x, self.lora_a[...].astype(self.dtype), n)  # [..., R]
      delta = jax.lax.dot_general(xa, self.lora_b[...].astype(self.dtype),
                                  (((xa.ndim - 1,), (0,)), ((), ())))
      y = y + self.lora_scale * delta
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 (CLIP and SigLIP towers, Phi decoders)."""

  def __init__(self, dim: int, axis_name: str, *, eps: float, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), (axis_name,), param_dtype)
    self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), (axis_name,), param_dtype)
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32 (LLaMA): x / rms(x) * scale."""

  def __init__(self, dim: int, axis_name: str, *, eps: float, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), (axis_name,), param_dtype)
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def rope(x: jax.Array, positions: jax.Array, theta: float, dims: int | None = None
         ) -> jax.Array:
  """Rotary embedding, "rotate half" layout (as LLaMA and Phi in transformers).

  x float[B, T, N, H], positions int32[B, T]; computed in float32. `dims` (even, <= H;
  None: H) leading dims of each head are rotated with frequencies theta^(-2i/dims), the
  rest pass through unchanged (Phi's partial rotary).
  """
  r = x.shape[-1] if dims is None else dims
  inv_freq = 1.0 / (theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))  # [R/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
  x32 = x.astype(jnp.float32)
  rot, rest = x32[..., :r], x32[..., r:]
  x1, x2 = jnp.split(rot, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return jnp.concatenate([rot * cos + rotated * sin, rest], -1).astype(x.dtype)
