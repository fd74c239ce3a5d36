import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_jax import target
from mm_jax.config import ConfigError
from mm_jax.kernels.attention import attention_reference
from mm_jax.models import attention
from mm_jax.models.multimodal import resolve_backends


@pytest.mark.parametrize("n,k", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_xla_attention_matches_reference_with_segments(n, k, causal):
  b, t, h = 2, 12, 16
  ks = jax.random.split(jax.random.key(n * 10 + k), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  kk = jax.random.normal(ks[1], (b, t, k, h))
  v = jax.random.normal(ks[2], (b, t, k, h))
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
  out = attention.attend(q, kk, v, segment_ids=seg, causal=causal, impl="xla")
  ref = attention_reference(q, kk, v, segment_ids=seg, causal=causal)
  real = np.asarray(seg > 0)  # padding rows are never read
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)


def test_segments_do_not_attend_across():
  b, t, n, h = 1, 8, 2, 8
  q = jax.random.normal(jax.random.key(0), (b, t, n, h))
  v = jax.random.normal(jax.random.key(1), (b, t, n, h))
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2]])
  out = attention.attend(q, q, v, segment_ids=seg, causal=True, impl="xla")
  v2 = v.at[:, :4].set(100.0)  # changing segment 1 must not move segment 2
  out2 = attention.attend(q, q, v2, segment_ids=seg, causal=True, impl="xla")
  np.testing.assert_allclose(out[:, 4:], out2[:, 4:], rtol=1e-6)


def test_auto_resolves_per_target(tiny):
  """kernels/choice.py's table: XLA on CPU, our kernels on TPU, cuDNN (the proven baseline)
  on GPU for 16-bit models, our Triton kernels where cuDNN cannot run; merge XLA until a
  device benchmark says otherwise. cudnn off a GPU names the key."""
  cfg = tiny().model
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")
  cpu, tpu = target.Target("cpu", "cpu"), target.Target("tpu", "TPU v5")
  h100 = target.Target("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
  pick = lambda c, t: (resolve_backends(c, t).attention, resolve_backends(c, t).merge)
  assert pick(cfg, cpu) == ("xla", "xla")
  assert pick(bf16, tpu) == ("pallas", "xla")
  assert pick(bf16, h100) == ("cudnn", "xla")
  assert pick(cfg, h100) == ("pallas", "xla")  # float32: cuDNN attention needs 16 bits
  wide = dataclasses.replace(bf16, decoder=dataclasses.replace(bf16.decoder, head_dim=256))
  assert pick(wide, h100) == ("pallas", "xla")
  with pytest.raises(ConfigError, match="config.model.attention: cudnn needs a GPU target"):
    resolve_backends(dataclasses.replace(cfg, attention="cudnn"), cpu)
  with target.use(h100):  # no target given: target.current()
    assert resolve_backends(bf16).attention == "cudnn"


def test_pallas_under_a_mesh_runs_per_shard_and_matches_xla():
  from mm_jax import sharding
  from mm_jax.config import MeshConfig

  mesh = sharding.make_mesh(MeshConfig(2, 2, 2), jax.devices()[:8])
  q = jax.random.normal(jax.random.key(0), (4, 32, 4, 16))
  k = jax.random.normal(jax.random.key(1), (4, 32, 2, 16))
  seg = jnp.array([[1] * 20 + [2] * 12] * 4)

  def grads(impl):
    loss = lambda q, k: (attention.attend(q, k, k, segment_ids=seg, causal=True,
                                          impl=impl) ** 2).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
    qs = jax.device_put(q, sharding.batch_sharding(mesh, 4))
    ours, ref = grads("pallas")(qs, k), grads("xla")(qs, k)
    hlo = jax.jit(grads("pallas")).lower(qs, k).as_text()
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert "manual_computation" in hlo or "shard_map" in hlo  # the kernel runs per shard


def test_cudnn_calls_of_odd_length_run_xla():
  """cuDNN's backward refuses odd sequence lengths (a CLIP tower's 577 tokens with its class
  token): such calls take XLA's attention, here even on a CPU that has no cuDNN."""
  q = jax.random.normal(jax.random.key(0), (2, 65, 4, 16))
  out = attention.attend(q, q, q, segment_ids=None, causal=False, impl="cudnn")
  ref = attention.attend(q, q, q, segment_ids=None, causal=False, impl="xla")
  np.testing.assert_array_equal(out, ref)
