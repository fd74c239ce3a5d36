"""Build the train state abstractly, shard it by the rules table, initialise it in place.

Nothing is ever materialised whole on one host: `jax.eval_shape` gives the abstract
state, `sharding.state_shardings` its layout, and `jax.jit(init, out_shardings=...)`
creates every shard where it lives.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax import sharding, target
from mm_jax.config import Config
from mm_jax.interop import hf_import
from mm_jax.models import lora, quant, stack
from mm_jax.models.multimodal import MultimodalModel, resolve_backends
from mm_jax.train import base, optim
from mm_jax.train.checkpoint import Checkpointer, restore_target
from mm_jax.train.step import StepFns, TrainState


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (eval jit cache)
class Built:
  fns: StepFns
  init: callable  # () -> TrainState
  abstract: TrainState  # ShapeDtypeStructs
  shardings: TrainState  # NamedShardings


def _split(model: MultimodalModel, freeze: tuple[str, ...]):
  """graphdef, trainable params, frozen params. LoRA adapters always train: `freeze`
  names base parameters (a stage freezes r"^decoder/" and still trains its adapters)."""
  frozen = optim.frozen_filter(freeze)
  trainable = nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.Not(frozen)))
  return nnx.split(model, trainable, ...)


def build(cfg: Config, mesh: jax.sharding.Mesh) -> Built:
  model_cfg = resolve_backends(cfg.model, target.Target.of_mesh(mesh))
  make_model = lambda: lora.apply(MultimodalModel(model_cfg, rngs=nnx.Rngs(cfg.train.seed)),
                                  cfg.lora, cfg.train.seed)
  graphdef, _, _ = _split(nnx.eval_shape(make_model), cfg.optim.freeze)
  tx = optim.make_tx(cfg.optim, cfg.train.steps)

  def init() -> TrainState:
    _, params, frozen = _split(make_model(), cfg.optim.freeze)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                      opt_state=tx.init(params))

  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, mesh)
  dropout_seed = cfg.train.seed if cfg.lora.rank and cfg.lora.dropout else None
  fns = StepFns(graphdef, tx, optim.schedule(cfg.optim, cfg.train.steps), cfg.optim.grad_accum,
                dropout_seed, cfg.train.loss_chunk)
  return Built(fns, init, abstract, shardings)


# XLA's CPU scheduler does not bound the initializers' live float32 temporaries: one jit
# over phi2's state (5.6 GB in bf16) went past 22.8 GB and was killed. Above this many
# float32 bytes of parameters per device, CPU initialises the state in groups of leaves.
_CPU_INIT_GROUP_BYTES = 1 << 30


def _init_bytes(x: jax.ShapeDtypeStruct, sharding) -> int:
  """float32 bytes a leaf's initializer makes per device: its values start as float32
  whatever they are stored as, and a uint8 NF4 code byte holds two of them."""
  per_value = 8 if x.dtype == np.uint8 else 4
  return int(np.prod(sharding.shard_shape(x.shape))) * per_value


def random_init(built: Built) -> TrainState:
  """The state from `built.init` in its shardings: one jit, or on CPU, for a big state,
  one jit per group of leaves of about _CPU_INIT_GROUP_BYTES (float32). `built.init` is traced
  once; each group's jit replays it keeping only its leaves (XLA drops the rest), so the
  values are the same bits either way, at a peak of one group's temporaries."""
  leaves, treedef = jax.tree.flatten(built.abstract)
  shards = treedef.flatten_up_to(built.shardings)
  local = [_init_bytes(x, s) for x, s in zip(leaves, shards, strict=True)]
  on_cpu = target.Target.of_device(shards[0].mesh.devices.flat[0]).platform == "cpu"
  if not on_cpu or sum(local) <= _CPU_INIT_GROUP_BYTES:
    return jax.jit(built.init, out_shardings=built.shardings)()
  groups, size = [[]], 0.0
  for i, n in enumerate(local):
    if groups[-1] and size + n > _CPU_INIT_GROUP_BYTES:
      groups.append([])
      size = 0.0
    groups[-1].append(i)
    size += n
  replay = jax.extend.core.jaxpr_as_fun(jax.make_jaxpr(built.init)())
  out = [None] * len(leaves)
  for group in groups:
    pick = lambda g=group: [replay()[i] for i in g]
    made = jax.jit(pick, out_shardings=[shards[i] for i in group])()
    for i, x in zip(group, made, strict=True):
      out[i] = x
  return treedef.unflatten(out)


def initialise(built: Built, cfg: Config | None = None) -> TrainState:
  """A fresh state in its shardings. With `cfg`, parameters covered by `cfg.init`'s Hugging
  Face folders are streamed in; when they cover all of them nothing is randomly
  initialised (AdamW's moments start at zero either way)."""
  if cfg is None or not any(dataclasses.astuple(cfg.init)):
    return random_init(built)
  if cfg.lora.base_qtype != "none":
    return _initialise_quantised(built, cfg)
  paths = stack.layer_path_set(pair for tree in (built.abstract.params, built.abstract.frozen)
                               for pair in nnx.to_flat_state(tree))
  if paths <= hf_import.covered(cfg.init, cfg.model):
    state = restore_target(built.abstract, built.shardings)
  else:
    state = random_init(built)
  params, frozen = hf_import.init_from_hf(cfg.init, cfg.model, [state.params, state.frozen])
  if isinstance(state.step, jax.ShapeDtypeStruct):
    opt_state = jax.jit(built.fns.tx.init, out_shardings=built.shardings.opt_state)(params)
    step = jax.device_put(np.zeros((), np.int32), built.shardings.step)
    return TrainState(step=step, params=params, frozen=frozen, opt_state=opt_state)
  return state.replace(params=params, frozen=frozen)


def _initialise_quantised(built: Built, cfg: Config) -> TrainState:
  """Hugging Face folders hold float kernels: read them into the unquantised twin of the
  model (same paths, same adapters), then quantise its frozen base kernel by kernel."""
  fp_cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, base_qtype="none"))
  mesh = jax.tree.leaves(built.shardings)[0].mesh
  fp = initialise(build(fp_cfg, mesh), fp_cfg)
  frozen = base.quantize_frozen(fp.frozen, built.abstract.frozen, built.shardings.frozen, cfg)
  return fp.replace(frozen=frozen)  # trainable params and optimizer state are the same


def restore(built: Built, cfg: Config, ckpt: Checkpointer, step: int, data=None, *,
            optimizer: bool = True) -> TrainState:
  """The train state at checkpoint `step` (and the data position, with `data`). A LoRA
  checkpoint has no base: it is rebuilt from its source and must match the fingerprint.

  optimizer=False: the optimizer state is never read and comes back None (generate and
  eval need only the weights; AdamW's moments are twice their size)."""
  target = restore_target(built.abstract, built.shardings)
  lora_base = base.saves_base(cfg)
  if lora_base:
    target = target.replace(frozen=None)
  if optimizer:
    out = ckpt.restore(step, target, data, with_base=lora_base)
  else:
    fields = {k: getattr(target, k) for k in ("step", "params", "frozen")
              if getattr(target, k) is not None}
    out = ckpt.restore(step, fields, data, with_base=lora_base, partial=True)
  state, saved = out if lora_base else (out, None)
  if not optimizer:
    state = TrainState(step=state["step"], params=state["params"],
                       frozen=state.get("frozen"), opt_state=None)
  if not lora_base:
    return state
  fresh = initialise(built, cfg)
  base.check(saved, fresh.frozen, cfg, f"{ckpt.directory} step {step}")
  return state.replace(frozen=fresh.frozen)


def param_counts(abstract: TrainState) -> dict[str, int]:
  """Parameters per top-level module (towers/<m>, projectors/<m>, decoder) and trainable."""
  counts: dict[str, int] = {}
  for group, tree in (("trainable", abstract.params), ("frozen", abstract.frozen)):
    for path, v in nnx.to_flat_state(tree):
      n = quant.stored_params(str(path[-1]), int(np.prod(v.shape)))
      module = _module(path)
      counts[module] = counts.get(module, 0) + n
      counts[group] = counts.get(group, 0) + n
  counts["total"] = counts.get("trainable", 0) + counts.get("frozen", 0)
  return counts


def trainable_modules(abstract: TrainState) -> set[str]:
  """Top-level module names (as in `param_counts`) that hold trainable parameters."""
  return {_module(path) for path, _ in nnx.to_flat_state(abstract.params)}


def _module(path) -> str:
  """Parameter path -> module name: towers/<m>, projectors/<m> or decoder."""
  return "decoder" if path[0] == "decoder" else "/".join(str(p) for p in path[:2])
