"""--mode=generate: a trained checkpoint (or a Hugging Face LLaVA folder) answers a prompt."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import numpy as np

from mm_jax import paths, sharding
from mm_jax.config import Config
from mm_jax.infer import generate, prompts
from mm_jax.models.audio import tokens_for_frames
from mm_jax.models.multimodal import MultimodalModel


def load_model(cfg: Config, workdir: str | None, mesh) -> tuple[MultimodalModel, str]:
  """The latest checkpoint in `workdir`, else the `config.init` Hugging Face folders.

  Returns the model (parameters in `mesh`'s shardings) and where it came from.
  """
  from mm_jax.interop import hf

  if workdir and paths.isdir(paths.join(workdir, "checkpoints")):
    model, step = hf.restore_model(cfg, workdir, mesh=mesh)
    return model, f"{workdir}/checkpoints step {step}"
  if not any(dataclasses.astuple(cfg.init)):
    raise FileNotFoundError(f"--mode=generate: no checkpoint under --workdir={workdir} and no "
                            "config.init.llava_from_hf folder")
  return hf.load_model(cfg, mesh), cfg.init.llava_from_hf or "config.init"


def answer(cfg: Config, model: MultimodalModel, text: str, images: Sequence[str] = (),
           videos: Sequence[str] = (), audios: Sequence[str] = ()) -> str:
  """The model's reply to one prompt with its media files, decoded to text."""
  for m, files, slots in (("image", images, cfg.data.images_per_sample),
                          ("video", videos, cfg.data.videos_per_sample),
                          ("audio", audios, cfg.data.audios_per_sample)):
    if len(files) > slots:
      raise prompts.PromptError(f"{len(files)} {m} files but config.data.{m}s_per_sample is "
                                f"{slots}")
  tok = prompts.tokenizer_for(cfg)
  mods = cfg.model.modalities
  batch = {}
  if "image" in mods:
    batch["images"] = prompts.load_images(cfg, images)
    batch["image_valid"] = np.arange(len(batch["images"])) < len(images)
  if "video" in mods:
    batch["video"] = prompts.load_videos(cfg, videos)
    batch["video_valid"] = np.arange(len(batch["video"])) < len(videos)
  audio_tokens = []
  if "audio" in mods:
    batch["audio"], batch["audio_frames"] = prompts.load_audio(cfg, audios)
    batch["audio_valid"] = np.arange(len(batch["audio"])) < len(audios)
    audio_tokens = [tokens_for_frames(int(n), cfg.model.audio)
                    for n in batch["audio_frames"][:len(audios)]]
  ids = prompts.encode(cfg, tok, text, len(images), n_videos=len(videos),
                       audio_tokens=audio_tokens)
  stops = prompts.stop_ids(cfg, tok)
  g = cfg.generate
  settings = generate.Decoding(g.max_new_tokens, g.temperature, g.top_k, g.top_p, stops,
                               int(tok.pad_id))
  batch.update(generate.left_pad([ids], settings.pad_id))
  out = generate.Generator(model, settings)(batch, seed=g.seed)[0]
  return tok.decode([i for i in out if i not in stops])


def warn_missing_media(cfg: Config, images: Sequence[str] = (), videos: Sequence[str] = (),
                       audios: Sequence[str] = ()) -> str | None:
  """Logs one warning line when the model reads a modality no file was given for (it then
  answers without it, silently otherwise); returns the line, None when nothing is missing."""
  given = {"image": images, "video": videos, "audio": audios}
  missing = [m for m in cfg.model.modalities if not given[m]]
  if not missing:
    return None
  rest = [m for m in cfg.model.modalities if given[m]]
  basis = " and ".join(["text", *rest]) if rest else "text"
  line = (f"--mode=generate: no {' or '.join(f'--{m}' for m in missing)} given, so the model "
          f"answers from the {basis} alone")
  logging.warning(line)
  return line


def main(cfg: Config, workdir: str | None, text: str, images: Sequence[str] = (),
         videos: Sequence[str] = (), audios: Sequence[str] = ()) -> str:
  if jax.process_index() == 0:
    warn_missing_media(cfg, images, videos, audios)
  mesh = sharding.make_mesh(cfg.mesh)
  model, origin = load_model(cfg, workdir, mesh)
  with jax.set_mesh(mesh):
    reply = answer(cfg, model, text, images, videos, audios)
  if jax.process_index() == 0:
    print(f"[{origin}] {text!r} -> {reply}", flush=True)
  return reply
