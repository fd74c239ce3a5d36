"""Time codes shared by video frames and audio tokens (issue 7; `model.time_code`).

A clip's time is cut into S = video.num_frames equal slots, one per sampled frame: the
loaders sample frames uniformly, frame k being the middle of the k-th of S equal parts
(data/video.py), so frame k is slot k. An audio token is in slot k when its centre lies in
the k-th part of the clip's audio. One learned vector per slot is added to the projected
rows of both modalities: what is seen and what is heard at the same time carry the same
code, and one attention head can match them by content wherever they sit in the sequence.
(Qwen2.5-Omni's TMRoPE shares temporal *positions* instead; an additive code leaves the
packer's positions and the decoder untouched.) Measured on the tiny MIMO task: see
configs/mimo.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.models.layers import param
from mm_jax.timeslots import audio_slots


class TimeCode(nnx.Module):
  """S learned vectors float[S, D], one per time slot, added to media rows."""

  def __init__(self, slots: int, width: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    # std 0.5, the scale of the projected rows: a code as faint as the text embeddings
    # (0.02) barely moves attention or a per-row feature at first, and what is read "at a
    # time" (the square's place in frame 0, not 1) has to be learned through it. Measured
    # on the tiny MIMO preset, seed 1 (600 steps, docs/notes): binding 0.56 and xor 1.00 at 0.02,
    # 0.94 and 1.00 at 0.5. (An earlier measurement favoured 0.02, on a task whose timing
    # questions could not be learned at any scale: synthetic_av's docstring.)
    self.table = param(rngs, jax.nn.initializers.normal(0.5), (slots, width),
                       (None, "embed"), param_dtype)

  def video(self, rows: jax.Array, frames: int) -> jax.Array:
    """float[M, F * P, D] (frame-major rows) -> same, frame f's rows plus code f."""
    m, n, d = rows.shape
    code = self.table[...][:frames].astype(rows.dtype)
    return (rows.reshape(m, frames, n // frames, d) + code[None, :, None]).reshape(m, n, d)

  def audio(self, rows: jax.Array, valid: jax.Array) -> jax.Array:
    """float[M, L, D] rows with bool[M, L] validity -> rows plus each token's slot code."""
    count = jnp.maximum(valid.sum(-1, keepdims=True), 1)
    slots = audio_slots(jnp.arange(rows.shape[1])[None, :], count, self.table.shape[0])
    return rows + jnp.take(self.table[...], slots, axis=0).astype(rows.dtype)
