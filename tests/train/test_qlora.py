"""QLoRA (issue 8): a block-quantised frozen base under LoRA adapters; adapter dropout;
checkpoints that hold what trains plus a fingerprint of the base."""

import dataclasses

import jax
import numpy as np
import pytest
from drivers import losses_on_mesh
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_lora import SMALL, _batch, flat, logits, lora_config

from mm_jax import sharding
from mm_jax.config import ConfigError
from mm_jax.data import pipeline
from mm_jax.models import lora, quant
from mm_jax.models.multimodal import MultimodalModel, resolve_backends
from mm_jax.train import base as base_lib
from mm_jax.train import batches
from mm_jax.train import state as state_lib
from mm_jax.train.checkpoint import Checkpointer


def qlora_config(**overrides):
  return lora_config("finetune_qlora", **overrides)


@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_zero_b_is_the_dequantised_base(qtype):
  cfg = qlora_config(**{"lora.base_qtype": qtype})
  model_cfg = resolve_backends(cfg.model)
  adapted = lora.apply(MultimodalModel(model_cfg, rngs=nnx.Rngs(0)), cfg.lora, 0)
  q = adapted.decoder.layers[0].q
  assert q.qtype == qtype and q.kernel is None
  # The plain model with the same dequantised kernels: merge folds B = 0 into them.
  base = lora.merge(lora.apply(MultimodalModel(model_cfg, rngs=nnx.Rngs(0)), cfg.lora, 0))
  assert base.decoder.layers[0].q.qtype is None
  batch = _batch(cfg)
  np.testing.assert_allclose(logits(adapted, batch), logits(base, batch), rtol=0, atol=2e-6)
  # ... and close to the unquantised model (int8 closer than nf4).
  plain = MultimodalModel(model_cfg, rngs=nnx.Rngs(0))
  err = np.abs(logits(adapted, batch) - logits(plain, batch)).max()
  assert 0 < err < {"int8": 0.02, "nf4": 0.5}[qtype], err


def test_qlora_trains_adapters_only_keeps_the_base_and_shards_like_the_kernels():
  cfg = qlora_config(**SMALL, **{"mesh.data": 1})
  one, state, built, _ = losses_on_mesh(cfg, jax.devices()[:1], 3)
  assert np.isfinite(one).all()
  params, frozen = flat(state.params), flat(state.frozen)
  for name in params:
    assert name.startswith("projectors/") or name.endswith(("/lora_a", "/lora_b")), name
  assert frozen["decoder/layers/0/q/kernel_nf4"].dtype == np.uint8
  assert "decoder/layers/0/q/kernel" not in frozen
  fresh = flat(jax.jit(built.init)().frozen)
  assert set(fresh) == set(frozen)
  for name, value in frozen.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(fresh[name]), err_msg=name)

  # The same steps on a (2, 2, 2) mesh: codes and scales are sharded like the kernel.
  cfg = qlora_config(**SMALL, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  losses, state, _, _ = losses_on_mesh(cfg, jax.devices()[:8], 2)
  np.testing.assert_allclose(losses, one[:2], rtol=1e-5)
  specs = {k: v.sharding.spec for k, v in flat(state.frozen).items()}
  assert specs["decoder/layers/0/gate/kernel_nf4"] == P("fsdp", "tensor")
  assert specs["decoder/layers/0/gate/kernel_scale"] == P("fsdp", "tensor")
  assert specs["decoder/layers/0/q/kernel_nf4"] == P("fsdp", "tensor", None)
  assert specs["decoder/layers/0/o/kernel_nf4"] == P("tensor", "fsdp")  # [N*H/2, D]


def test_adapter_dropout_is_keyed_and_off_in_eval():
  cfg = lora_config(**{"lora.dropout": 0.5})
  model = lora.apply(MultimodalModel(resolve_backends(cfg.model), rngs=nnx.Rngs(0)),
                     cfg.lora, 0)
  for path, m in nnx.iter_modules(model):
    if m.__class__.__name__ == "Dense" and m.lora_b is not None:
      m.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(len(path)), m.lora_b.shape)
  batch = _batch(cfg)
  run = lambda: np.asarray(model(batch))
  off = run()
  lora.set_dropout_keys(model, jax.random.key(0))
  on = run()
  lora.set_dropout_keys(model, jax.random.key(0))
  np.testing.assert_array_equal(run(), on)  # a pure function of the key
  lora.set_dropout_keys(model, jax.random.key(1))
  other = run()
  assert np.abs(on - off).max() > 1e-3 and np.abs(other - on).max() > 1e-3


def test_checkpoint_holds_what_trains_and_refuses_another_base(tmp_path):
  cfg = qlora_config(**SMALL, **{"mesh.data": 1, "checkpoint.async_save": False})
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  built = state_lib.build(cfg, mesh)
  state = state_lib.initialise(built, cfg)
  state = state.replace(params=jax.tree.map(lambda x: x + 1, state.params))  # "trained"
  record = {"fingerprint": base_lib.fingerprint(state.frozen), "source": base_lib.source(cfg)}
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), cfg.checkpoint)
  data = pipeline.train_iterator(cfg.data, batches.row_spec(cfg), global_batch=8, seed=0)
  ckpt.save(5, state, data, base=record)
  ckpt.wait()
  restored = state_lib.restore(built, cfg, ckpt, 5)
  weights = state_lib.restore(built, cfg, ckpt, 5, optimizer=False)  # generate's restore
  assert weights.opt_state is None
  for r in (restored, weights):
    for a, b in ((r.params, state.params), (r.frozen, state.frozen)):
      for (name, x), (_, y) in zip(flat(a).items(), flat(b).items(), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  # The stored state has no base: its tree lists adapters and the projector only.
  meta = ckpt.manager.item_metadata(5)["state"]
  stored = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(meta)[0]]
  assert stored and not any("kernel_nf4" in s or "towers" in s for s in stored), stored[:5]
  other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1))
  with pytest.raises(ConfigError, match="different frozen base"):
    state_lib.restore(state_lib.build(other, mesh), other, ckpt, 5)
  ckpt.close()


def test_fingerprint_is_exact_and_layout_free():
  cfg = qlora_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  one = state_lib.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:8]))
  with jax.set_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:8])):
    frozen8 = state_lib.initialise(one).frozen
  frozen1 = jax.jit(one.init)().frozen  # unsharded, same values
  assert base_lib.fingerprint(frozen8) == base_lib.fingerprint(frozen1)
  flip = jax.tree.map(lambda x: x, frozen1)
  leaf = flip["decoder"]["layers"][1]["up"]["kernel_nf4"]
  leaf[...] = leaf[...].at[3, 5].set(leaf[...][3, 5] ^ 1)  # one bit of one code
  assert base_lib.fingerprint(flip) != base_lib.fingerprint(frozen1)


def test_qlora_stage_on_every_preset_and_memory():
  for preset in ("tiny", "7b", "phi2"):
    cfg = lora_config("finetune_qlora", preset=preset)
    assert cfg.lora.base_qtype == "nf4" and cfg.lora.dropout == 0.05
  with pytest.raises(ValueError, match=r"config\.lora\.base_qtype"):
    lora_config("finetune", **{"lora.base_qtype": "nf4"})  # nothing to quantise under
