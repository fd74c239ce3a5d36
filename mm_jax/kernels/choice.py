"""What `model.attention = auto` and `model.merge = auto` pick per compile target, and why.

The rule (docs/architecture.md has the table): a kernel of ours is picked only where it
compiles for the target (CI compiles every kernel for TPU and GPU) and a measurement says it
wins. cuDNN through `jax.nn.dot_product_attention` is the proven GPU baseline; XLA's
where+gather the merge baseline. Each choice carries its reason, logged once per run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax.numpy as jnp

from mm_jax.target import Target

# cuDNN's fused attention: 16-bit inputs, head dims that are multiples of 8 up to 128.
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class Choice:
  impl: str
  why: str


CPU = Choice("xla", "CPU: Pallas kernels would run in the interpreter (tests only)")


def attention(tgt: Target, dtype: str, head_dims: tuple[int, ...]) -> Choice:
  """The attention backend for `tgt` and a model computing in `dtype` with these head dims
  (the decoder's and the towers')."""
  if tgt.platform == "cpu":
    return CPU
  if tgt.platform == "tpu":
    return Choice("pallas", "TPU: our flash kernels compile for v5e, v5p and v6e and keep no "
                            "[T, S] scores (7b stage 2 on v5p-8: 56.0 GiB per chip beside "
                            "69.2 with XLA's attention, compiled plans)")
  if jnp.dtype(dtype).name not in CUDNN_DTYPES:
    return Choice("pallas", f"GPU, {dtype}: cuDNN attention needs bf16 or fp16; our Triton "
                            "kernels keep no [T, S] scores, XLA's would")
  bad = [h for h in head_dims if h % 8 or h > CUDNN_MAX_HEAD_DIM]
  if bad:
    return Choice("pallas", f"GPU, head dim {bad[0]}: cuDNN needs a multiple of 8 up to "
                            f"{CUDNN_MAX_HEAD_DIM}")
  return Choice("cudnn", "GPU: cuDNN is the proven baseline; no device benchmark has shown "
                         "ours faster yet (bench/gpu.sh)")


def cudnn_odd_length(t: int, s: int) -> str:
  """The backend for a cuDNN attention call of odd length: cuDNN's backward refuses odd
  sequence lengths ("Unsupported sequence length", e.g. a CLIP tower's 577 tokens with its
  class token), so such calls run XLA's attention; logged once per shape."""
  _log_odd(t, s)
  return "xla"


@functools.cache
def _log_odd(t: int, s: int) -> None:
  logging.getLogger(__name__).info("cudnn attention: T %d, S %d not even (cuDNN's backward "
                                   "needs even lengths): XLA's attention for this call", t, s)


def merge(tgt: Target) -> Choice:
  """The multimodal merge backend for `tgt`."""
  if tgt.platform == "cpu":
    return CPU
  if tgt.platform == "tpu":
    return Choice("xla", "TPU: our merge compiles but saves no memory (7b stage 2 on v5p-16: "
                         "40.55 GiB per chip beside 40.37 with XLA's) and moves rows by serial "
                         "DMAs; no TPU measurement has shown it faster")
  return Choice("xla", "GPU: our merge compiles, but no device benchmark has shown it faster "
                       "than XLA's where+gather yet (bench/gpu.sh)")


@functools.cache
def log(kind: str, tgt: Target, choice: Choice) -> None:
  logging.getLogger(__name__).info("%s=auto on %s: %s (%s)", kind, tgt.name, choice.impl,
                                   choice.why)
