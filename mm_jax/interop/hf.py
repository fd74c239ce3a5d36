r"""Hugging Face in and out: sharded models from HF folders or checkpoints, and the export CLI.

  python -m mm_jax.interop.hf export --workdir=/tmp/tiny --out=/tmp/tiny_hf [--step=N]
      [--dtype=bfloat16] [--max_shard_gb=2] [--peft_out=/tmp/tiny_peft]

writes a LlavaForConditionalGeneration folder (an image model) or a
LlavaNextVideoForConditionalGeneration folder (a video model), hf_export.py, from the run's
config.json and its latest (or N-th) orbax checkpoint, with the tokenizer, the run's chat
template and its generation config; that class's `from_pretrained(out)` loads it with no
missing keys. A LoRA run (config.lora.rank > 0) exports merged weights
(adapters folded into the base kernels by `lora.merge`). `--peft_out=P` (with or without
--out) writes the adapters alone as a PEFT folder (peft_export.py), which
`peft.PeftModel.from_pretrained(base, P)` loads over the LLaVA the run started from.
Importing is `config.init.*` (hf_import.py): training applies it when it starts fresh, and
`load_model` for inference.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
from flax import nnx

from mm_jax import config as config_lib
from mm_jax import paths, sharding, target
from mm_jax.config import Config, MeshConfig
from mm_jax.interop import hf_export, peft_export
from mm_jax.interop.hf_import import covered, init_from_hf
from mm_jax.models import lora, stack
from mm_jax.models.multimodal import MultimodalModel, resolve_backends

__all__ = ["export", "init_from_hf", "load_model", "read_run_config", "restore_model"]


def load_model(cfg: Config, mesh: jax.sharding.Mesh) -> MultimodalModel:
  """A MultimodalModel (parameters only, no optimizer) sharded over `mesh`, with every
  parameter that `cfg.init`'s folders cover streamed in. Nothing is randomly initialised
  when they cover all of it (llava_from_hf); otherwise the rest is from `cfg.train.seed`."""
  from mm_jax.train.checkpoint import restore_target

  model_cfg = resolve_backends(cfg.model, target.Target.of_mesh(mesh))
  make = lambda: MultimodalModel(model_cfg, rngs=nnx.Rngs(cfg.train.seed))
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  shardings = sharding.state_shardings(abstract, mesh)
  if stack.layer_path_set(nnx.to_flat_state(abstract)) <= covered(cfg.init, cfg.model):
    state = restore_target(abstract, shardings)
  else:
    with jax.set_mesh(mesh):
      state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  (state,) = init_from_hf(cfg.init, cfg.model, [state])
  return nnx.merge(graphdef, state)


def restore_model(cfg: Config, workdir: str, step: int | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> tuple[MultimodalModel, int]:
  """(model, step) from WORKDIR/checkpoints (the latest step unless `step`), restored into
  `mesh`'s shardings (default: FSDP over every device). The optimizer state is not read."""
  from mm_jax.train import state as state_lib
  from mm_jax.train.checkpoint import Checkpointer

  directory = paths.join(workdir, "checkpoints")
  if not paths.isdir(directory):
    raise FileNotFoundError(f"{workdir}: no checkpoints/ folder (train there first)")
  mesh = mesh or sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
  built = state_lib.build(cfg, mesh)
  from mm_jax.train import recovery

  # read_only: a run training in this workdir may be writing a checkpoint right now.
  ckpt = Checkpointer(directory, cfg.checkpoint, read_only=True)
  try:
    if step is not None and step not in ckpt.manager.all_steps():
      raise FileNotFoundError(f"{directory}: no checkpoint for step {step} "
                              f"(have {sorted(ckpt.manager.all_steps())})")
    with jax.set_mesh(mesh):
      # A LoRA run: base from its source. No optimizer state: generation needs none.
      if step is None:  # the newest that verifies
        state, step = recovery.restore_latest(built, cfg, ckpt, workdir, optimizer=False,
                                              move_aside=False)
        if state is None:
          raise FileNotFoundError(f"{directory}: no checkpoint (train there first)")
      else:
        state = state_lib.restore(built, cfg, ckpt, step, optimizer=False)
  finally:
    ckpt.close()
  return nnx.merge(built.fns.graphdef, state.params, state.frozen), step


def read_run_config(workdir: str) -> Config:
  """WORKDIR/config.json (written by training) as a validated Config."""
  path = paths.join(workdir, "config.json")
  if not paths.isfile(path):
    raise FileNotFoundError(f"{path}: missing (is {workdir} a training workdir?)")
  return config_lib.from_config_dict(json.loads(paths.read_text(path)))


def export(workdir: str, out: str = "", step: int | None = None, *, dtype: str = "",
           max_shard_bytes: int = 2 * 10**9, peft_out: str = "") -> list[str]:
  """A training workdir's checkpoint -> a Hugging Face LLaVA folder `out` (merged weights for
  a LoRA run) and/or a PEFT adapter folder `peft_out`; returns the paths written."""
  if jax.process_count() > 1:
    raise ValueError("export runs in a single process (it gathers each tensor to this host)")
  if not (out or peft_out):
    raise ValueError("nothing to export: pass out and/or peft_out")
  cfg = read_run_config(workdir)
  hf_export.check_exportable(cfg.model)  # before paying for the restore
  if peft_out and cfg.lora.rank == 0:
    raise config_lib.ConfigError(f"config.lora.rank: 0 in {workdir}: the run has no LoRA "
                                 "adapters for --peft_out (export --out alone)")
  model, step = restore_model(cfg, workdir, step)
  files = []
  if peft_out:  # before the merge, which removes the adapters
    files += [os.path.join(peft_out, f) for f in
              peft_export.export_llava(model, cfg, peft_out, dtype=dtype)]
    print(f"exported {workdir} step {step} adapters to {peft_out}", flush=True)
  if out:
    # Explicit: hf_export refuses unmerged adapters rather than dropping them.
    model = lora.merge(model) if cfg.lora.rank else model
    files += [os.path.join(out, f) for f in
              hf_export.export_model(model, cfg, out, dtype=dtype,
                                     max_shard_bytes=max_shard_bytes)]
    print(f"exported {workdir} step {step} to {out}"
          + (" (LoRA merged)" if cfg.lora.rank else ""), flush=True)
  return files


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mm_jax.interop.hf",
                                   description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("export", help="checkpoint -> LlavaForConditionalGeneration / "
                     "LlavaNextVideoForConditionalGeneration folder and/or PEFT adapters")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default="", help="LLaVA folder (a LoRA run's adapters merged)")
  p.add_argument("--peft_out", default="",
                 help="PEFT adapter folder of a LoRA run (adapter_config.json + "
                 "adapter_model.safetensors)")
  p.add_argument("--step", type=int, default=None, help="default: the latest")
  p.add_argument("--dtype", default="", choices=["", *config_lib.DTYPES],
                 help="weights dtype (default: config.model.param_dtype)")
  p.add_argument("--max_shard_gb", type=float, default=2.0)
  args = parser.parse_args(argv)
  if not (args.out or args.peft_out):
    parser.error("export needs --out and/or --peft_out")
  try:
    export(args.workdir, args.out, args.step, dtype=args.dtype,
           max_shard_bytes=int(args.max_shard_gb * 1e9), peft_out=args.peft_out)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    # One line and exit 1, as main.py reports a config error (docs/reliability.md); 2 stays
    # argparse's, for a command line it cannot parse.
    kind = "config error" if isinstance(e, config_lib.ConfigError) else "error"
    parser.exit(1, f"{kind}: {e}\n")


if __name__ == "__main__":
  main()
