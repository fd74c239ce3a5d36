import jax
import numpy as np
import pytest
from conftest import mimo_config, tiny_config
from drivers import losses_on_mesh
from flax import nnx
from jax.sharding import PartitionSpec as P

from mm_jax import sharding

SMALL = {"train.batch_size": 8, "data.num_train": 64}


@pytest.fixture(scope="module")
def single_device_losses():
  cfg = tiny_config(**SMALL, **{"mesh.data": 1})
  return losses_on_mesh(cfg, jax.devices()[:1], 3)[0]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_layouts_match_one_device(shape, single_device_losses):
  cfg = tiny_config(**SMALL, **{"mesh.data": shape[0], "mesh.fsdp": shape[1],
                                "mesh.tensor": shape[2]})
  losses, state, _, _ = losses_on_mesh(cfg, jax.devices()[:8], 3)
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
  assert losses[-1] < losses[0]  # it trains, on every layout

  # Parameters really are sharded as the rules table says.
  flat = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(state.params)}
  def spec(name):
    return flat[name].sharding.spec
  fsdp = "fsdp" if shape[1] > 1 else None
  tensor = "tensor" if shape[2] > 1 else None
  assert spec("decoder/layers/0/gate/kernel") == P(fsdp, tensor)
  assert spec("decoder/layers/0/down/kernel") == P(tensor, fsdp)
  assert spec("decoder/layers/0/q/kernel") == P(fsdp, tensor, None)
  assert spec("decoder/embedding") == P(tensor, fsdp)
  assert spec("towers/image/blocks/0/fc1/kernel") == P(fsdp, tensor)
  assert spec("decoder/layers/0/attn_norm/scale") == P(fsdp)
  if shape[1] * shape[2] > 1:  # each device holds a fraction of the MLP weight
    w = flat["decoder/layers/0/gate/kernel"]
    assert w.addressable_shards[0].data.size == w.size // (shape[1] * shape[2])


def test_optimizer_state_is_sharded_like_params():
  cfg = tiny_config(**SMALL, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  _, state, _, _ = losses_on_mesh(cfg, jax.devices()[:8], 1)
  mu = state.opt_state[1][0].mu  # chain(clip, adamw) -> adamw's ScaleByAdamState
  flat = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(mu)}
  assert flat["decoder/layers/0/gate/kernel"].sharding.spec == P("fsdp", "tensor")


def test_undivisible_dimension_stays_replicated():
  mesh = sharding.make_mesh(tiny_config(**{"mesh.data": 1, "mesh.tensor": 8}).mesh,
                            jax.devices()[:8])
  assert sharding.spec_for(("embed", "kv_heads", "head_dim"), (64, 4, 16), mesh) == P(
      None, None, None)
  assert sharding.spec_for(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == P(
      None, "tensor", None)


def test_mesh_errors():
  cfg = tiny_config(**{"mesh.data": 3, "mesh.fsdp": -1})
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh(cfg.mesh, jax.devices()[:8])


def test_mimo_model_trains_the_same_sharded():
  """Video + audio towers and projectors follow the rules table too (issue 7)."""
  small = {**SMALL, "data.num_train": 16}
  one, _, _, _ = losses_on_mesh(mimo_config(**small, **{"mesh.data": 1}), jax.devices()[:1], 2)
  cfg = mimo_config(**small, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  losses, state, _, _ = losses_on_mesh(cfg, jax.devices()[:8], 2)
  np.testing.assert_allclose(losses, one, rtol=1e-5)
  flat = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(state.params)}
  assert flat["towers/audio/blocks/0/fc1/kernel"].sharding.spec == P("fsdp", "tensor")
  assert "fsdp" in tuple(flat["projectors/video/fc1/kernel"].sharding.spec)
