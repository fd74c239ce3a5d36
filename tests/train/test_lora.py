"""LoRA fine-tuning (issue 8): adapters start as a no-op, only they (and the projector)
train, they shard by the rules table, and they learn."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from conftest import _with_overrides
from drivers import losses_on_mesh
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import llava
from mm_jax import sharding
from mm_jax.config import ConfigError
from mm_jax.data import pipeline
from mm_jax.models import lora
from mm_jax.models.multimodal import MultimodalModel, resolve_backends
from mm_jax.train import batches
from mm_jax.train import state as state_lib
from mm_jax.train.step import train_step

SMALL = {"train.batch_size": 8, "data.num_train": 64}


def lora_config(stage="finetune_lora", preset="tiny", **overrides):
  return _with_overrides(llava.get_config(f"{preset},stage={stage}"), overrides)


def flat(tree) -> dict:
  return {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(tree)}


@jax.jit
def _logits(graphdef, params, batch):
  return nnx.merge(graphdef, params)(batch)


def logits(model, batch) -> np.ndarray:
  return np.asarray(_logits(*nnx.split(model), batch))


def _batch(cfg, n=4):
  data = pipeline.train_iterator(cfg.data, batches.row_spec(cfg), global_batch=n, seed=0)
  return jax.tree.map(jax.numpy.asarray, next(data))


def test_zero_b_is_the_base_model_and_merge_folds_adapters():
  cfg = lora_config()
  model_cfg = resolve_backends(cfg.model)
  base = MultimodalModel(model_cfg, rngs=nnx.Rngs(0))
  adapted = lora.apply(MultimodalModel(model_cfg, rngs=nnx.Rngs(0)), cfg.lora, 0)
  # Exact at the layer (eager); across the model only to rounding, as the two compiled
  # programs differ (XLA fuses the extra adapter ops and its neighbours differently).
  q, q_base = adapted.decoder.layers[0].q, base.decoder.layers[0].q
  x = jax.random.normal(jax.random.key(1), (2, 3, q.kernel.shape[0]))
  np.testing.assert_array_equal(np.asarray(q(x)), np.asarray(q_base(x)))
  batch = _batch(cfg)
  np.testing.assert_allclose(logits(adapted, batch), logits(base, batch), rtol=0, atol=2e-6)

  # A trained (non-zero) B changes the output; folding it into W gives the same function.
  for path, m in nnx.iter_modules(adapted):
    if m.__class__.__name__ == "Dense" and m.lora_b is not None:
      key = jax.random.key(len(path))
      m.lora_b[...] = 0.05 * jax.random.normal(key, m.lora_b.shape)
  adapted_logits = logits(adapted, batch)
  assert np.abs(adapted_logits - logits(base, batch)).max() > 1e-3
  merged = lora.merge(adapted)
  assert not any(k.endswith(("lora_a", "lora_b")) for k in flat(nnx.state(merged)))
  np.testing.assert_allclose(logits(merged, batch), adapted_logits, rtol=1e-4, atol=1e-4)


def test_targets_that_match_nothing_are_an_error():
  cfg = lora_config(**{"lora.targets": (r"^decoder/nope$",)})
  with pytest.raises(ValueError, match="config.lora.targets"):
    state_lib.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


def test_only_adapters_and_projector_train():
  cfg = lora_config(**SMALL, **{"mesh.data": 1})
  _, state, built, _ = losses_on_mesh(cfg, jax.devices()[:1], 3)
  params = flat(state.params)
  assert params, "nothing trains"
  for name in params:
    assert name.startswith("projectors/") or name.endswith(("/lora_a", "/lora_b")), name
  adapters = [n for n in params if n.endswith("/lora_b")]
  assert "decoder/layers/0/q/lora_b" in adapters and "decoder/layers/1/down/lora_b" in adapters
  assert len(adapters) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
  mu = flat(state.opt_state[1][0].mu)  # chain(clip, adamw) -> adamw's ScaleByAdamState
  assert set(mu) == set(params)

  fresh = jax.jit(built.init)()  # same seed: the state before training
  before, after = flat(fresh.frozen), flat(state.frozen)
  assert "decoder/layers/0/q/kernel" in after and "towers/image/blocks/0/fc1/kernel" in after
  for name, value in after.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(before[name]), err_msg=name)
  start = flat(fresh.params)
  for name in adapters:
    assert not np.array_equal(np.asarray(params[name]), np.asarray(start[name])), name


def test_adapters_shard_and_match_one_device():
  one, _, _, _ = losses_on_mesh(lora_config(**SMALL, **{"mesh.data": 1}), jax.devices()[:1], 2)
  cfg = lora_config(**SMALL, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  losses, state, built, _ = losses_on_mesh(cfg, jax.devices()[:8], 2)
  np.testing.assert_allclose(losses, one, rtol=1e-5)

  axes = {"/".join(map(str, p)): v.get_metadata()["logical_axes"]
          for p, v in nnx.to_flat_state(built.abstract.params)}
  assert axes["decoder/layers/0/q/lora_a"] == ("embed", None)
  assert axes["decoder/layers/0/q/lora_b"] == (None, "heads", "head_dim")
  assert axes["decoder/layers/0/o/lora_a"] == ("heads", "head_dim", None)
  assert axes["decoder/layers/0/down/lora_b"] == (None, "embed")
  specs = {k: v.sharding.spec for k, v in flat(state.params).items()}
  assert specs["decoder/layers/0/q/lora_a"] == P("fsdp", None)
  assert specs["decoder/layers/0/q/lora_b"] == P(None, "tensor", None)
  assert specs["decoder/layers/0/down/lora_a"] == P("tensor", None)
  assert specs["decoder/layers/0/down/lora_b"] == P(None, "fsdp")
  assert flat(state.frozen)["decoder/layers/0/gate/kernel"].sharding.spec == P("fsdp", "tensor")


def _train(cfg, steps: int, start=None):
  """Losses of `steps` steps on one device, from `start`'s parameters (by path) if given."""
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  built = state_lib.build(cfg, mesh)
  spec = batches.row_spec(cfg)
  fn = jax.jit(functools.partial(train_step, built.fns), donate_argnums=0)
  data = pipeline.train_iterator(cfg.data, spec, global_batch=cfg.train.batch_size, seed=0)
  state = jax.jit(built.init)()
  if start is not None:
    src = {**flat(start.params), **flat(start.frozen)}
    def load(tree):
      return jax.tree_util.tree_map_with_path(
          lambda p, v: src.get("/".join(str(getattr(k, "key", k)) for k in p[:-1]), v), tree)
    state = dataclasses.replace(state, params=load(state.params), frozen=load(state.frozen))
  losses = []
  for _ in range(steps):
    state, m = fn(state, next(data))
    losses.append(float(m["loss"]))
  return np.array(losses), state


@pytest.mark.slow  # 100 + 100 steps: ~3 min on 2 loaded CPU cores
def test_lora_alone_keeps_learning():
  """Pretrain the tiny model briefly, then LoRA (projector + adapters) lowers the loss
  further with the base frozen."""
  small = {"train.batch_size": 16, "data.num_train": 2000, "train.steps": 200,
           "mesh.data": 1}
  full, state = _train(_with_overrides(llava.get_config("tiny"), small), 100)
  lora_losses, _ = _train(lora_config(**small), 100, start=state)
  # Same base, B = 0: the first LoRA step sees the pretrained model, not a fresh one.
  assert lora_losses[0] < full[:5].mean()
  assert lora_losses[-20:].mean() < full[-20:].mean() < full[:5].mean()


@pytest.mark.parametrize("preset", ["tiny", "1b", "7b", "13b", "phi2"])
def test_lora_stages_and_errors(preset):
  cfg = lora_config(preset=preset)
  assert cfg.lora.rank == 8 and cfg.optim.freeze == (r"^towers/", r"^decoder/")
  assert cfg.optim.lr == (2e-3 if preset == "tiny" else 2e-4)  # tiny keeps its own lr
  with pytest.raises(ValueError, match=r"config\.lora\.rank"):
    lora_config(preset=preset, **{"lora.rank": 0})
  assert lora_config("finetune_qlora", preset=preset).lora.base_qtype == "nf4"
  with pytest.raises(ValueError, match=r"config\.lora\.targets\[0\]"):
    lora_config(preset=preset, **{"lora.targets": ("(",)})


def test_scanned_adapters_train_like_unrolled_and_shard_with_a_layers_dim():
  """model.scan_layers: adapters (and a quantised base) are stacked [L, ...] like their
  kernels, their dropout keys follow the layer paths, and two steps on a (2, 2, 2) mesh lose
  what the unrolled model loses on one device. QLoRA: LoRA, a quantised base and dropout."""
  stage = "finetune_qlora"
  want, _, _, _ = losses_on_mesh(lora_config(stage, **SMALL, **{"mesh.data": 1}),
                                 jax.devices()[:1], 2)
  cfg = lora_config(stage, **SMALL, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                       "model.scan_layers": True})
  got, state, _, _ = losses_on_mesh(cfg, jax.devices()[:8], 2)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  params, frozen = flat(state.params), flat(state.frozen)
  for name in params:
    assert name.startswith("projectors/") or name.endswith(("/lora_a", "/lora_b")), name
  depth = cfg.model.decoder.depth
  assert params["decoder/layers/scan/q/lora_b"].shape[0] == depth
  assert params["decoder/layers/scan/q/lora_a"].sharding.spec == P(None, "fsdp", None)
  assert frozen["decoder/layers/scan/gate/kernel_nf4"].sharding.spec == P(None, "fsdp", "tensor")
  assert "towers/image/blocks/scan/fc1/kernel" in frozen


@pytest.mark.parametrize("key,value,error", [
    ("lora.targets", (r"^decoder/layers/0/q$",), "adapt only some layers"),
    ("optim.freeze", (r"^towers/", r"^decoder/layers/1/"), "picks layers \\[1\\]"),
])
def test_a_pattern_that_splits_a_scanned_stack_is_a_config_error(key, value, error):
  cfg = lora_config(**{"model.scan_layers": True, key: value})
  with pytest.raises(ConfigError, match=error):
    state_lib.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
