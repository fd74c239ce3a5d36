"""Whisper-style audio tower (Radford et al. 2022), with Qwen2-Audio's temporal pooling.

log-mel float[B, L, n_mels] (100 frames per second) -> conv k3 + GELU -> conv k3 stride 2 +
GELU -> + fixed sinusoids -> pre-LN transformer blocks -> average pool by `pool` -> final
LayerNorm: float[B, L', D] with L' = ceil(L / 2) // pool (Qwen2-Audio's AvgPool1d(2) drops an
odd last frame the same way). GELU is the exact erf form, as in transformers.

Unlike transformers' encoder (which demands exactly 30 s of input), any L <= 2 *
max_source_positions works, and a frame mask keeps short clips from attending to padding.
Validity, for `valid` bool[B, L] marking a clip's frames (a prefix of each row):
  * stem: output frame j (input window 2j-2..2j+2) is valid iff input frame 2j is;
    a clip of n frames keeps ceil(n / 2);
  * pool: pooled frame i is valid iff all of stem frames pool*i .. pool*i + pool - 1 are;
    so n input frames give `tokens_for_frames(n, cfg)` = ceil(n / 2) // pool valid rows.
Invalid input frames and invalid conv1 outputs are zeroed (where the convs of a clip alone
would see their zero padding), and attention runs per segment (1 = valid, 0 = padding): a
clip padded to any length gives, on its valid rows, what it gives alone. Invalid output
rows are zero.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax import sharding
from mm_jax.config import AudioConfig
from mm_jax.models import attention, remat
from mm_jax.models.layers import ACTIVATIONS, Dense, LayerNorm, param
from mm_jax.models.stack import Stack

_gelu = ACTIVATIONS["gelu"]  # exact erf GELU (transformers' "gelu")


def tokens_for_frames(n_frames: int, cfg: AudioConfig) -> int:
  """Valid output rows (placeholder tokens) for a clip of `n_frames` log-mel frames."""
  return ((n_frames + 1) // 2) // cfg.pool


@functools.lru_cache(maxsize=8)
def sinusoids(length: int, channels: int) -> np.ndarray:
  """Whisper's position table float32[length, channels]: [sin | cos] over geometric
  timescales 1 .. 10000, a constant (not a parameter). Angles reach ~1500 rad, so float32
  rounding matters: built in float32 like transformers' `sinusoids` (exp rounded from
  float64), it matches transformers' table within 4e-5 (float64 angles would differ ~1e-4)."""
  step = np.float32(-math.log(10000) / (channels // 2 - 1))
  inv = np.exp((step * np.arange(channels // 2, dtype=np.float32)).astype(np.float64))
  inv = inv.astype(np.float32)
  angles = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
  table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  table.setflags(write=False)  # shared by the cache
  return table


class Conv1d(nnx.Module):
  """float[B, L, C] -> float[B, ceil(L / stride), D]: kernel 3, zero padding 1 each side.

  kernel float[3, C, D] (transformers' Conv1d weight [D, C, 3] transposed).
  """

  def __init__(self, c_in: int, c_out: int, *, stride: int, rngs: nnx.Rngs, dtype, param_dtype):
    init = jax.nn.initializers.normal((3 * c_in) ** -0.5)
    self.kernel = param(rngs, init, (3, c_in, c_out), (None, None, "audio_embed"), param_dtype)
    self.bias = param(rngs, jax.nn.initializers.zeros, (c_out,), ("audio_embed",), param_dtype)
    self.stride, self.dtype = stride, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride,), ((1, 1),),
        dimension_numbers=("NWC", "WIO", "NWC"))
    return y + self.bias[...].astype(self.dtype)


class AudioBlock(nnx.Module):
  """Pre-LN transformer block; Whisper's key projection has no bias."""

  def __init__(self, cfg: AudioConfig, *, attention_impl: str, rngs: nnx.Rngs, dtype,
               param_dtype):
    d, n = cfg.width, cfg.heads
    h = d // n
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    qkv_axes = ("audio_embed", "audio_heads", "head_dim")
    self.ln1 = LayerNorm(d, "audio_embed", eps=cfg.layer_norm_eps, **kw)
    self.q = Dense((d,), (n, h), qkv_axes, use_bias=True, **kw)
    self.k = Dense((d,), (n, h), qkv_axes, use_bias=False, **kw)
    self.v = Dense((d,), (n, h), qkv_axes, use_bias=True, **kw)
    self.o = Dense((n, h), (d,), ("audio_heads", "head_dim", "audio_embed"), use_bias=True, **kw)
    self.ln2 = LayerNorm(d, "audio_embed", eps=cfg.layer_norm_eps, **kw)
    self.fc1 = Dense((d,), (cfg.mlp_dim,), ("audio_embed", "audio_mlp"), use_bias=True, **kw)
    self.fc2 = Dense((cfg.mlp_dim,), (d,), ("audio_mlp", "audio_embed"), use_bias=True, **kw)
    self.attention_impl = attention_impl

  def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """float[B, L, D], int32[B, L] (1 valid, 0 padding) -> float[B, L, D]."""
    y = self.ln1(x)
    out = attention.attend(self.q(y), self.k(y), self.v(y), segment_ids=segment_ids,
                           causal=False, impl=self.attention_impl,
                           heads=("audio_heads", "audio_heads"))
    x = x + self.o(out)
    return x + self.fc2(_gelu(self.fc1(self.ln2(x))))


class AudioTower(nnx.Module):
  """log-mel float[B, L, n_mels], valid bool[B, L] -> float[B, L', D], bool[B, L']."""

  def __init__(self, cfg: AudioConfig, *, attention_impl: str = "xla", remat: str = "none",
               scan: bool = False, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.cfg = cfg
    d = cfg.width
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv1 = Conv1d(cfg.n_mels, d, stride=1, **kw)
    self.conv2 = Conv1d(d, d, stride=2, **kw)
    block = lambda: AudioBlock(cfg, attention_impl=attention_impl, **kw)
    self.blocks = (Stack(block, cfg.depth) if scan
                   else nnx.List([block() for _ in range(cfg.depth)]))
    self.final_ln = LayerNorm(d, "audio_embed", eps=cfg.layer_norm_eps, **kw)
    self.remat, self.dtype = remat, dtype

  def embed(self, mel: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Conv stem + positions: float[B, ceil(L/2), D] and its validity bool[B, ceil(L/2)]."""
    length = mel.shape[1]
    if length > 2 * self.cfg.max_source_positions:
      raise ValueError(f"audio: {length} log-mel frames > 2 * max_source_positions "
                       f"({2 * self.cfg.max_source_positions})")
    keep = valid[..., None].astype(self.dtype)
    x = _gelu(self.conv1(mel.astype(self.dtype) * keep)) * keep
    x = _gelu(self.conv2(x))
    pos = sinusoids(self.cfg.max_source_positions, self.cfg.width)[:x.shape[1]]
    return x + jnp.asarray(pos, self.dtype), valid[:, ::2]

  def encode(self, mel: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """States after the last block, before pooling and the final LayerNorm (L/2 frames)."""
    x, valid = self.embed(mel, valid)
    segments = valid.astype(jnp.int32)
    if isinstance(self.blocks, Stack):
      def body(block, x, segments):
        with jax.named_scope("audio_block"):
          return sharding.constrain(block(x, segments), "act_batch", "act_seq", "act_embed")
      return self.blocks.run(body, x, segments, remat=self.remat), valid
    call = remat.wrap(lambda b, x, s: b(x, s), self.remat)
    for block in self.blocks:
      with jax.named_scope("audio_block"):
        x = sharding.constrain(call(block, x, segments), "act_batch", "act_seq", "act_embed")
    return x, valid

  def __call__(self, mel: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float[B, L, n_mels], bool[B, L] -> float[B, ceil(L/2) // pool, D] and its validity."""
    x, valid = pool_frames(*self.encode(mel, valid), self.cfg.pool)
    return jnp.where(valid[..., None], self.final_ln(x), 0), valid


def pool_frames(x: jax.Array, valid: jax.Array, pool: int) -> tuple[jax.Array, jax.Array]:
  """Average of `pool` consecutive frames (a trailing remainder is dropped, as AvgPool1d):
  float[B, L, D], bool[B, L] -> float[B, L // pool, D], bool[B, L // pool]
  (a pooled frame is valid iff all its frames are)."""
  if pool == 1:
    return x, valid
  b, length, d = x.shape
  n = length // pool
  x = x[:, :n * pool].reshape(b, n, pool, d).astype(jnp.float32).mean(axis=2).astype(x.dtype)
  return x, valid[:, :n * pool].reshape(b, n, pool).all(axis=2)
