"""The one function main.py calls: typed config -> dry run, train, eval or generate."""

from __future__ import annotations

import jax

from mm_jax import accelerators, aot, paths, sharding, target
from mm_jax import config as config_lib


def dry_run(cfg: config_lib.Config, memory_plan: bool = False,
            machine: accelerators.Machine | None = None) -> dict:
  """Builds the model abstractly (no weights allocated) and prints parameter counts and the
  memory estimate (mm_jax/train/memory.py). With `memory_plan`, the train step compiled for
  the configured mesh: its kernels, XLA's per-device plan and FLOPs. With `machine` (the
  --target), the mesh is over that machine's devices (mm_jax/aot.py), the train and decode
  steps compile with its own compiler, and the result says whether they fit its memory."""
  from mm_jax.train import batches, memory
  from mm_jax.train import state as state_lib

  mesh = sharding.make_mesh(cfg.mesh, aot.devices(machine) if machine else None)
  compiles = memory_plan or machine is not None
  if compiles:  # the compile splits each micro-batch over the devices
    batches.check_batch(cfg, mesh)
  print(_header(cfg, mesh, machine), flush=True)
  built = state_lib.build(cfg, mesh)
  counts = state_lib.param_counts(built.abstract)
  rows = [(k, v) for k, v in counts.items() if "/" in k or k == "decoder"]
  rows += [("total", counts["total"]), (f"trainable (stage={cfg.stage})", counts["trainable"])]
  for name, n in rows:
    size = f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    print(f"{name:32s} {n:>16,d}  ({size})")
  print("\n".join(memory.format_table(cfg, memory.table(cfg, built.abstract))), flush=True)
  return {**counts, **_compile_report(cfg, mesh, built, machine)} if compiles else counts


def _header(cfg: config_lib.Config, mesh, machine: accelerators.Machine | None) -> str:
  tgt = target.Target.of_mesh(mesh)
  where = machine.label if machine else f"this host: {mesh.size} {tgt.platform} device(s)"
  per_device = cfg.train.batch_size / cfg.optim.grad_accum / (mesh.shape["data"]
                                                              * mesh.shape["fsdp"])
  return (f"mm_jax: dry run for {where}; mesh {dict(mesh.shape)}; micro-batch {per_device:g} "
          f"x {cfg.data.seq_len} per data-parallel device, grad_accum {cfg.optim.grad_accum}, "
          f"remat {cfg.model.remat}")


def _compile_report(cfg: config_lib.Config, mesh, built,
                    machine: accelerators.Machine | None) -> dict:
  """Compiles the train step (and with a machine, the decode step), prints what compiled
  and the closing fits line; returns the plan's figures, the kernels and whether it fits."""
  from mm_jax.models.multimodal import resolve_backends
  from mm_jax.train import compile_check

  tgt = target.Target.of_mesh(mesh)
  resolved = resolve_backends(cfg.model, tgt)
  print(f"backends for {tgt.name}: attention={resolved.attention}, merge={resolved.merge}",
        flush=True)
  reports = [compile_check.train_step(cfg, mesh, built)]
  if machine:
    reports.append(compile_check.decode_step(cfg, mesh))
  for report in reports:
    print("\n".join(compile_check.format_report(report, tgt)), flush=True)
  line, fits = compile_check.verdict(machine.name if machine else tgt.platform, reports, tgt)
  print(line, flush=True)
  plan = reports[0].plan
  return {"plan_total_bytes": plan.total, "plan_temp_bytes": plan.temp, "fits": fits,
          "kernels": reports[0].kernels}


# config.lora fields that decide the checkpoint's parameters (adapters, a quantised base).
_LORA_SHAPE_KEYS = ("lora.rank", "lora.targets", "lora.base_qtype", "lora.block_size")


def _get(values: dict, key: str):
  for part in key.split("."):
    values = values[part]
  return values


def _set(values: dict, key: str, value) -> None:
  *groups, last = key.split(".")
  for part in groups:
    values = values[part]
  values[last] = value


def _param_shapes(cfg: config_lib.Config) -> dict:
  """{parameter path: shape} of `cfg.model`, built abstractly (nothing allocated)."""
  from flax import nnx

  from mm_jax.models.multimodal import MultimodalModel, resolve_backends

  model = nnx.eval_shape(lambda: MultimodalModel(resolve_backends(cfg.model),
                                                 rngs=nnx.Rngs(0)))
  return {path: v.get_value().shape for path, v in nnx.to_flat_state(nnx.state(model))}


def _with_run_config(values: dict, workdir: str, explicit: tuple[str, ...],
                     mode: str) -> config_lib.Config:
  """WORKDIR/config.json (what the run trained with) with only the keys given on the
  command line taken from `values`; one that changes a parameter shape is refused."""
  import json

  path = paths.join(workdir, "config.json")
  saved = json.loads(paths.read_text(path))
  base = config_lib.from_config_dict(saved)
  merged = json.loads(json.dumps(saved))
  changed = []
  for key in explicit:
    try:
      value, before = _get(values, key), _get(saved, key)
    except (KeyError, TypeError):
      raise config_lib.ConfigError(f"config.{key}: not a key of {path}") from None
    value = json.loads(json.dumps(value))  # tuples as the JSON file holds them: lists
    _set(merged, key, value)
    if value != before:
      changed.append(key)
  cfg = config_lib.from_config_dict(merged)
  for key in changed:
    one = json.loads(json.dumps(saved))
    _set(one, key, _get(merged, key))
    shape_key = key in _LORA_SHAPE_KEYS or key.startswith("model.")
    if shape_key and (key in _LORA_SHAPE_KEYS
                      or _param_shapes(config_lib.from_config_dict(one)) != _param_shapes(base)):
      raise config_lib.ConfigError(
          f"config.{key}: {_get(merged, key)!r} on the command line, {_get(saved, key)!r} in "
          f"{path}: it changes the checkpoint's parameters; drop the override (--mode={mode} "
          "reads the run's own config)")
  if jax.process_index() == 0:
    given = ", ".join(f"{k}={_get(merged, k)!r}" for k in changed) or "none"
    print(f"mm_jax: --mode={mode} uses {path} (the run's config); overrides: {given}",
          flush=True)
  return cfg


def resolve(cd, workdir: str | None = None, mode: str = "train",
            explicit: tuple[str, ...] = ()) -> config_lib.Config:
  """The typed config a command runs with.

  eval and generate on a workdir that holds config.json: that file, with only the
  `explicit` keys (those given on the command line) taken from `cd`. Otherwise `cd` with
  the shapes of its config.init Hugging Face folders and its tokenizer adopted
  (interop/hf_adopt.py); an explicit key that contradicts a folder is an error.
  """
  values = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
  if mode in ("eval", "generate") and workdir and paths.isfile(
      paths.join(workdir, "config.json")):
    return _with_run_config(values, workdir, explicit, mode)
  if any((values.get("init") or {}).values()) or (values.get("data") or {}).get("tokenizer"):
    from mm_jax.interop import hf_adopt

    values, notes = hf_adopt.adopt(config_lib.fill_defaults(values), explicit)
    if jax.process_index() == 0:
      for note in notes:
        print(f"mm_jax: {note}", flush=True)
  return config_lib.from_config_dict(values)


def main(cd, workdir: str | None, mode: str = "train", dry: bool = False, *,
         prompt: str = "", images: tuple[str, ...] = (), videos: tuple[str, ...] = (),
         audios: tuple[str, ...] = (), explicit: tuple[str, ...] = (),
         print_config: bool = False, memory_plan: bool = False,
         machine: accelerators.Machine | None = None) -> dict:
  """explicit: the config keys given on the command line (mm_jax.cli.explicit_keys);
  memory_plan: with `dry`, also compile the train step and print XLA's memory plan;
  machine: with `dry`, compile for that machine instead of this host (--target)."""
  if mode != "generate" and not workdir and not (dry or print_config):
    raise config_lib.ConfigError("--workdir: required for --mode=train and --mode=eval "
                                 "(where checkpoints, metrics and config.json live); only "
                                 "--dry_run and --print_config run without one")
  cfg = resolve(cd, workdir, mode, explicit)
  if print_config:
    from mm_jax import cli

    print(cli.format_config(cfg), flush=True)
    return {"config": config_lib.to_dict(cfg)}
  if dry:
    return dry_run(cfg, memory_plan, machine)
  if mode == "generate":
    from mm_jax.infer import chat

    return {"answer": chat.main(cfg, workdir, prompt, images, videos, audios)}
  from mm_jax.train import evaluate, loop

  if jax.process_index() == 0:
    mesh = dict(sharding.make_mesh(cfg.mesh).shape)  # -1 resolved: what the run will use
    print(f"mm_jax: {cfg.name} stage={cfg.stage} mode={mode} on {jax.device_count()} "
          f"{target.local().platform} device(s), mesh {mesh}", flush=True)
  if mode == "train":
    return loop.train(cfg, workdir)
  if mode == "eval":  # the run's batch size, maybe on fewer or more devices than it had
    from mm_jax.train import batches

    batches.check_batch(cfg, sharding.make_mesh(cfg.mesh), micro_batches=False)
    return evaluate.evaluate(cfg, workdir)
  raise ValueError(f"--mode={mode}: expected train, eval or generate")
