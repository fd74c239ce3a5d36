r"""Attention throughput: ours (Pallas) vs jax.nn.dot_product_attention (cuDNN, XLA) and
PyTorch SDPA, forward and forward+backward, bf16.

`ours` is `flash_attention` as dispatched: the Mosaic GPU (wgmma + TMA) kernels on sm90+,
Triton elsewhere; on sm90+ `ours_triton` adds the Triton kernels for comparison.

  python bench/attention.py            # the full table on a GPU (issue 3's shapes)
  python bench/attention.py --smoke    # tiny shapes, runs anywhere (CPU: interpreter)

FLOPs: forward 4 B T S N H (halved when causal), backward 2.5x forward. Shapes: B*T = 16k
tokens, N*H = 2048, T in 1k..8k, H 64 and 128, causal and not; plus GQA (16 heads, 2 KV
heads) and packed (4 segments per row) at T 4k, H 128.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import time_loop, versions  # noqa: E402
from mm_jax import target  # noqa: E402
from mm_jax.kernels import attention as fa  # noqa: E402
from mm_jax.kernels.attention import flash_attention  # noqa: E402


def cases(smoke: bool):
  if smoke:
    return [dict(t=64, h=64, n=2, k=2, causal=True, seg=0, b=2)]
  out = []
  for h in (64, 128):
    for t in (1024, 2048, 4096, 8192):
      for causal in (True, False):
        out.append(dict(t=t, h=h, n=2048 // h, k=2048 // h, causal=causal, seg=0))
  out.append(dict(t=4096, h=128, n=16, k=2, causal=True, seg=0))  # GQA 8
  out.append(dict(t=4096, h=128, n=16, k=16, causal=True, seg=4))  # packed
  for c in out:
    c["b"] = 16384 // c["t"]
  return out


def segments(b, t, n_seg):
  if not n_seg:
    return None
  return jnp.broadcast_to(jnp.repeat(jnp.arange(1, n_seg + 1), t // n_seg), (b, t)).astype(
      jnp.int32)


def jax_impls(smoke: bool):
  impls = {"ours": lambda q, k, v, seg, causal: flash_attention(q, k, v, segment_ids=seg,
                                                                causal=causal)}
  cap = target.local().capability
  if cap is not None and cap >= (9, 0):
    impls["ours_triton"] = triton_attention
  mask = lambda seg: None if seg is None else (seg[:, None, :, None] == seg[:, None, None, :])
  for name in ("cudnn", "xla"):
    if name == "cudnn" and target.local().platform != "gpu":
      continue
    impls[name] = (lambda impl: lambda q, k, v, seg, causal: jax.nn.dot_product_attention(
        q, k, v, mask=mask(seg), is_causal=causal, implementation=impl))(name)
  return impls


def triton_attention(q, k, v, seg, causal):
  """The Triton kernels that `flash_attention` uses before Hopper, called past dispatch."""
  b, t = q.shape[:2]
  seg = jnp.zeros((b, t), jnp.int32) if seg is None else seg
  bs = fa.BlockSizes.for_lengths(t, k.shape[1], fa.BlockSizes())
  return fa._flash(q, k, v, seg, causal, q.shape[-1] ** -0.5, bs, False)


def run_jax(fn, c, backward: bool, iters: int) -> float:
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (c["b"], c["t"], c["n"], c["h"]), jnp.bfloat16)
  k = jax.random.normal(kk, (c["b"], c["t"], c["k"], c["h"]), jnp.bfloat16)
  v = jax.random.normal(kv, (c["b"], c["t"], c["k"], c["h"]), jnp.bfloat16)
  seg = segments(c["b"], c["t"], c["seg"])
  if not backward:
    return time_loop(lambda q: fn(q, k, v, seg, c["causal"]), q, iters=iters)
  loss = lambda q, k, v: fn(q, k, v, seg, c["causal"]).astype(jnp.float32).sum()
  grad = jax.grad(loss, argnums=(0, 1, 2))
  # All three gradients feed the carry: with dQ alone, the dK/dV pass is dead code and
  # XLA drops it (the Pallas kernels' too): the table would time forward + dQ only.
  step = lambda qkv: jax.tree.map(lambda x, g: x + 1e-3 * g.astype(x.dtype), qkv, grad(*qkv))
  return time_loop(step, (q, k, v), iters=iters)


def run_torch(c, backward: bool, iters: int) -> float | None:
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    return None
  if not torch.cuda.is_available() or c["seg"]:
    return None
  dev, dt = "cuda", torch.bfloat16
  q = torch.randn(c["b"], c["n"], c["t"], c["h"], device=dev, dtype=dt, requires_grad=backward)
  k = torch.randn(c["b"], c["k"], c["t"], c["h"], device=dev, dtype=dt, requires_grad=backward)
  v = torch.randn_like(k, requires_grad=backward)
  gqa = c["n"] != c["k"]

  def once():
    o = F.scaled_dot_product_attention(q, k, v, is_causal=c["causal"], enable_gqa=gqa)
    if backward:
      o.sum().backward()

  for _ in range(3):
    once()
  start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
  times = []
  for _ in range(5):
    start.record()
    for _ in range(iters):
      once()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1000 / iters)
  return sorted(times)[len(times) // 2]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--iters", type=int, default=10)
  args = parser.parse_args()
  iters = 2 if args.smoke else args.iters
  impls = jax_impls(args.smoke)
  names = list(impls) + ["torch_sdpa"]
  print(f"# attention, bf16, {versions()}\n")
  print("| T | H | N/K | causal | seg | pass | " + " | ".join(f"{n} TFLOP/s" for n in names)
        + " |")
  print("|" + "---|" * (6 + len(names)))
  for c in cases(args.smoke):
    fwd_flops = 4 * c["b"] * c["t"] * c["t"] * c["n"] * c["h"] / (2 if c["causal"] else 1)
    for backward in (False, True):
      flops = fwd_flops * (3.5 if backward else 1.0)
      cells = []
      for name in names:
        try:
          secs = (run_torch(c, backward, iters) if name == "torch_sdpa"
                  else run_jax(impls[name], c, backward, iters))
          cells.append("n/a" if secs is None else f"{flops / secs / 1e12:.1f}")
        except Exception as e:  # an implementation that cannot run this shape
          cells.append(f"error: {type(e).__name__}")
      print(f"| {c['t']} | {c['h']} | {c['n']}/{c['k']} | {c['causal']} | {c['seg']} | "
            f"{'fwd+bwd' if backward else 'fwd'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
