"""An embedded, deterministic data set that a tiny model can learn: coloured shapes.

Each image holds 1-3 copies of one shape (circle, square, triangle) in one colour, each in
its own quadrant of the canvas. Stage-1 style samples caption the image ("two red
circles"); stage-2 style samples ask about colour, shape, count or (for one shape)
position. Sample i of a split is a pure function of (seed, split, i): no files, no
downloads, identical on every host.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mm_jax.data.text import IMAGE_TAG

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
           "yellow": (230, 210, 40), "purple": (150, 60, 200), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
QUADRANTS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
QUESTIONS = {
    "colour": ["what", "colour", "is", "the", "shape", "?"],
    "shape": ["what", "shape", "is", "it", "?"],
    "count": ["how", "many", "shapes", "?"],
    "position": ["where", "is", "the", "shape", "?"],
}
WORDS = tuple(COLOURS) + SHAPES + tuple(s + "s" for s in SHAPES) + COUNTS + tuple(
    sorted({w for q in QUESTIONS.values() for w in q} | {"top", "bottom", "left", "right"}))
SPLITS = {"train": 0, "eval": 1}
KINDS = (*QUESTIONS, "caption")  # per-kind eval accuracy reports these


@dataclasses.dataclass(frozen=True)
class Scene:
  colour: str
  shape: str
  quadrants: tuple[int, ...]  # one entry per object


def draw_scene(rng: np.random.Generator, size: int) -> tuple[Scene, np.ndarray]:
  """A random scene and its uint8[size, size, 3] rendering."""
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  count = int(rng.integers(1, 4))
  quadrants = tuple(int(q) for q in sorted(rng.choice(4, count, replace=False)))
  image = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)  # dark noisy background
  half = size // 2
  yy, xx = np.mgrid[0:half, 0:half]
  for q in quadrants:
    r = rng.uniform(0.25, 0.4) * half  # radius-like extent
    cy, cx = rng.uniform(r, half - r, 2)
    if shape == "circle":
      mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "square":
      mask = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    else:  # upward triangle: inside below the apex, between two slanted edges
      mask = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
    oy, ox = (q // 2) * half, (q % 2) * half
    image[oy:oy + half, ox:ox + half][mask] = COLOURS[colour]
  return Scene(colour, shape, quadrants), image


def caption(scene: Scene) -> list[str]:
  n = len(scene.quadrants)
  words = [COUNTS[n - 1], scene.colour, scene.shape + ("s" if n > 1 else "")]
  return words + (list(QUADRANTS[scene.quadrants[0]]) if n == 1 else [])


def question(scene: Scene, rng: np.random.Generator) -> tuple[str, list[str], list[str]]:
  """(kind, question words, answer words)."""
  kinds = list(QUESTIONS) if len(scene.quadrants) == 1 else ["colour", "shape", "count"]
  kind = kinds[rng.integers(len(kinds))]
  answer = {"colour": [scene.colour], "shape": [scene.shape],
            "count": [COUNTS[len(scene.quadrants) - 1]]}.get(kind)
  if kind == "position":
    answer = list(QUADRANTS[scene.quadrants[0]])
  return kind, QUESTIONS[kind], answer


def example(index: int, *, split: str, seed: int, image_size: int, task: str) -> dict:
  """Sample `index` of `split`: {"id", "image": uint8[S, S, 3], "prompt", "answer", "kind"}."""
  rng = np.random.default_rng((seed, SPLITS[split], index))
  scene, image = draw_scene(rng, image_size)
  if task == "caption":
    kind, prompt, answer = "caption", [IMAGE_TAG], caption(scene)
  else:
    kind, q, answer = question(scene, rng)
    prompt = [IMAGE_TAG] + q
  return {"id": f"synthetic-{split}-{index}", "image": image, "prompt": prompt,
          "answer": answer, "kind": kind}


def export_llava(out_dir: str, n: int, *, split: str = "train", seed: int = 0,
                 image_size: int = 64, task: str = "qa") -> str:
  """Writes samples 0..n-1 as a LLaVA-format folder (PNG images + data.json) and returns
  the JSON path: a small real-format data set for trying `data.source=llava_json`."""
  import json
  import os

  from PIL import Image

  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  records = []
  for i in range(n):
    ex = example(i, split=split, seed=seed, image_size=image_size, task=task)
    name = f"images/{split}_{i}.png"
    Image.fromarray(ex["image"]).save(os.path.join(out_dir, name))
    question = " ".join(w for w in ex["prompt"] if w != IMAGE_TAG)
    records.append({"id": ex["id"], "image": name, "conversations": [
        {"from": "human", "value": f"{IMAGE_TAG}\n{question}".rstrip()},
        {"from": "gpt", "value": " ".join(ex["answer"])}]})
  path = os.path.join(out_dir, f"{split}.json")
  with open(path, "w") as f:
    json.dump(records, f, indent=1)
  return path
