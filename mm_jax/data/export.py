r"""Write the embedded synthetic set as a LLaVA-format folder, with a tokenizer.json.

  python -m mm_jax.data.export --out=runs/shapes --train=2000 --eval=200

gives runs/shapes/{images/, train.json, eval.json, tokenizer.json}: a small real-format
data set to try `data.source=llava_json` with (see docs/data.md), and to test with.
"""

from __future__ import annotations

import argparse
import json
import os

from mm_jax.data import synthetic, templates, text


def train_tokenizer(path: str, corpus: list[str], vocab_size: int = 1000) -> None:
  """A byte-level BPE tokenizer.json (GPT-2 style) trained on `corpus`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer)
  tok.save(path)


def export(out: str, n_train: int, n_eval: int, *, image_size: int = 32) -> dict[str, str]:
  paths = {split: synthetic.export_llava(out, n, split=split, image_size=image_size)
           for split, n in (("train", n_train), ("eval", n_eval))}
  records = json.load(open(paths["train"]))
  corpus = [templates.VICUNA_V1_SYSTEM + " USER: ASSISTANT:"] + [
      turn["value"] for r in records for turn in r["conversations"]]
  paths["tokenizer"] = os.path.join(out, "tokenizer.json")
  train_tokenizer(paths["tokenizer"], corpus * 3)
  return paths


def export_av_clips(out: str, n: int, *, split: str = "eval", frame_size: int = 32,
                    num_frames: int = 2) -> list[dict]:
  """Writes n audio-video task samples as files a user can pass to --mode=generate:
  `av_<split>_<i>.avi` (the frames, one per 1/num_frames s, MJPEG) and `.wav` (the clip),
  and returns their question, answer and kind. num_frames is the number of time slots, so
  it must be the model's `video.num_frames` (2 in configs/mimo.py:tiny) for the timing
  questions ("at time k", "when was", binding) to mean the same to the model."""
  import soundfile

  from mm_jax.data import synthetic_av, video

  os.makedirs(out, exist_ok=True)
  rows = []
  for i in range(n):
    ex = synthetic_av.example(i, split=split, seed=0, frame_size=frame_size,
                              num_frames=num_frames)
    stem = os.path.join(out, f"av_{split}_{i}")
    video.write_video(stem + ".avi", ex["frames"], fps=num_frames)
    soundfile.write(stem + ".wav", ex["waveform"], 16000)
    rows.append({"video": stem + ".avi", "audio": stem + ".wav", "kind": ex["kind"],
                 "question": " ".join(w for w in ex["prompt"] if not w.startswith("<")),
                 "answer": " ".join(ex["answer"])})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--train", type=int, default=2000)
  parser.add_argument("--eval", type=int, default=200)
  parser.add_argument("--av_clips", type=int, default=0,
                      help="instead: write this many held-out audio-video clips (mimo tiny)")
  parser.add_argument("--av_frames", type=int, default=2,
                      help="time slots (frames) per clip: the model's video.num_frames")
  args = parser.parse_args()
  if args.av_clips:
    print(json.dumps(export_av_clips(args.out, args.av_clips, num_frames=args.av_frames),
                     indent=1))
    return
  paths = export(args.out, args.train, args.eval)
  tok = text.load_tokenizer(paths["tokenizer"])
  print(json.dumps({**paths, "image_token_id": tok.tag_id(text.IMAGE_TAG),
                    "vocab_size": tok.vocab_size}, indent=1))


if __name__ == "__main__":
  main()
