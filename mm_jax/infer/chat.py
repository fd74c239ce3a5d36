"""--mode=generate: a trained checkpoint (or a Hugging Face LLaVA folder) answers a prompt."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np

from mm_jax import sharding
from mm_jax.config import Config
from mm_jax.infer import generate, prompts
from mm_jax.models.multimodal import MultimodalModel


def load_model(cfg: Config, workdir: str | None, mesh) -> tuple[MultimodalModel, str]:
  """The latest checkpoint in `workdir`, else the `config.init` Hugging Face folders.

  Returns the model (parameters in `mesh`'s shardings) and where it came from.
  """
  from mm_jax.interop import hf

  if workdir and os.path.isdir(os.path.join(workdir, "checkpoints")):
    model, step = hf.restore_model(cfg, workdir, mesh=mesh)
    return model, f"{workdir}/checkpoints step {step}"
  if not any(dataclasses.astuple(cfg.init)):
    raise FileNotFoundError(f"--mode=generate: no checkpoint under --workdir={workdir} and no "
                            "config.init.llava_from_hf folder")
  return hf.load_model(cfg, mesh), cfg.init.llava_from_hf or "config.init"


def answer(cfg: Config, model: MultimodalModel, text: str, image_paths: Sequence[str]) -> str:
  """The model's reply to one prompt with its images, decoded to text."""
  if len(image_paths) > cfg.data.images_per_sample:
    raise prompts.PromptError(f"{len(image_paths)} images but config.data.images_per_sample "
                              f"is {cfg.data.images_per_sample}")
  tok = prompts.tokenizer_for(cfg)
  ids = prompts.encode(cfg, tok, text, len(image_paths))
  stops = prompts.stop_ids(cfg, tok)
  g = cfg.generate
  settings = generate.Decoding(g.max_new_tokens, g.temperature, g.top_k, g.top_p, stops,
                               int(tok.pad_id))
  pixels = prompts.load_images(cfg, image_paths)
  batch = {**generate.left_pad([ids], settings.pad_id), "images": pixels,
           "image_valid": np.arange(len(pixels)) < len(image_paths)}
  out = generate.Generator(model, settings)(batch, seed=g.seed)[0]
  return tok.decode([i for i in out if i not in stops])


def main(cfg: Config, workdir: str | None, text: str, image_paths: Sequence[str]) -> str:
  mesh = sharding.make_mesh(cfg.mesh)
  model, origin = load_model(cfg, workdir, mesh)
  with jax.set_mesh(mesh):
    reply = answer(cfg, model, text, image_paths)
  if jax.process_index() == 0:
    print(f"[{origin}] {text!r} -> {reply}", flush=True)
  return reply
