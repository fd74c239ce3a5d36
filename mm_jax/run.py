"""The one function main.py calls: typed config -> dry run, train, eval or generate."""

from __future__ import annotations

import jax

from mm_jax import config as config_lib
from mm_jax import sharding


def dry_run(cfg: config_lib.Config) -> dict[str, int]:
  """Builds the model abstractly (no weights allocated) and prints parameter counts, then
  the memory table (mm_jax/train/memory.py)."""
  from mm_jax.train import memory
  from mm_jax.train import state as state_lib

  built = state_lib.build(cfg, sharding.make_mesh(cfg.mesh))
  counts = state_lib.param_counts(built.abstract)
  rows = [(k, v) for k, v in counts.items() if "/" in k or k == "decoder"]
  rows += [("total", counts["total"]), (f"trainable (stage={cfg.stage})", counts["trainable"])]
  for name, n in rows:
    size = f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    print(f"{name:32s} {n:>16,d}  ({size})")
  print("\n".join(memory.format_table(cfg, memory.table(cfg, built.abstract))))
  return counts


def main(cd, workdir: str | None, mode: str = "train", dry: bool = False, *,
         prompt: str = "", images: tuple[str, ...] = (), videos: tuple[str, ...] = (),
         audios: tuple[str, ...] = ()) -> dict:
  cfg = config_lib.from_config_dict(cd)
  if dry:
    return dry_run(cfg)
  if mode == "generate":
    from mm_jax.infer import chat

    return {"answer": chat.main(cfg, workdir, prompt, images, videos, audios)}
  if not workdir:
    raise ValueError("--workdir is required unless --dry_run")
  from mm_jax.train import loop

  if jax.process_index() == 0:
    print(f"mm_jax: {cfg.name} stage={cfg.stage} mode={mode} on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)", flush=True)
  if mode == "train":
    return loop.train(cfg, workdir)
  if mode == "eval":
    return loop.evaluate(cfg, workdir)
  raise ValueError(f"--mode={mode}: expected train, eval or generate")
