"""Weight decay reaches Dense/conv kernels only: never norms, biases or embeddings."""

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.config import DecoderConfig, OptimConfig
from mm_jax.models.decoder import Decoder
from mm_jax.train import optim


def test_weight_decay_only_on_kernels():
  cfg = DecoderConfig(vocab_size=16, width=8, depth=1, heads=2, kv_heads=2, mlp_dim=16,
                      attention_bias=True)  # q/k/v biases are [N, H]: rank 2, not kernels
  params = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  tx = optim.make_tx(OptimConfig(weight_decay=0.5, lr=1.0, clip_norm=0), 10)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)  # a zero gradient: decay alone
  moved = {"/".join(map(str, p)): bool(jnp.any(v[...] != 0))
           for p, v in nnx.to_flat_state(updates)}
  assert moved == {name: name.endswith("kernel") for name in moved}, moved
  assert moved["layers/0/q/kernel"] and not moved["layers/0/q/bias"]
