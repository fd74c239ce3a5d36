"""An embedded, deterministic audio-video data set that a tiny model can learn, and whose
"binding" and "xor" questions can only be answered by fusing both modalities.

Time is cut into T = num_frames equal slots: frame f shows slot f, and samples
[f * N // T, (f + 1) * N // T) of the clip are its sound. Visuals are bold squares (side
0.3 S) in one of four colours on a dark noisy background that either move steadily (up,
down, left or right, nearly edge to edge over the F frames) or flash (visible in one slot
only). Sounds are pure tones, low 300 Hz or high 1500 Hz (about 30 mel bins apart in an
80-bin log-mel), each filling the middle 80% of a slot, or one linear chirp between 300 and
1500 Hz over the whole clip; faint white noise everywhere.

Kinds (drawn uniformly) and their questions (template drawn uniformly):
  video    a moving shape; distractor sound (random tones, or a chirp).
           "what colour is the moving shape ?" -> colour
           "which way does the shape move ?" -> up | down | left | right
           or a shape moving up or down (as in xor); distractor sound.
           "does the shape move up or down ?" -> up | down
           or two shapes of different colours flash in two different slots (as in binding);
           distractor sound. "what colour flashed at time {k} ?" -> colour (k: one, two...)
  audio    one to three beeps of one pitch; distractor moving shape.
           "is the tone high or low ?" -> high | low;  "how many beeps ?" -> one | two | three
           or the chirp; distractor moving shape (up or down, as in xor).
           "does the sound rise or fall ?" -> rising | falling
           or one beep (either pitch) in one slot (as in binding); distractor moving shape.
           "when was the beep ?" -> one | two | ... (the slot)
  binding  two shapes of different colours flash in two different slots; one beep (either
           pitch) sounds in one of those slots, which one uniformly.
           "which colour flashed during the beep ?" -> colour. From video alone it is a coin
           flip between the two colours; from audio alone the colour is unknown.
  xor      a shape moves up or down and the chirp rises or falls, independently and
           uniformly. "do the shape and the sound go the same way ?" -> yes (up with rising,
           down with falling) | no: exactly 50% from either modality alone.

The two timing questions ("at time k", "when was") are the halves of binding, and the
vertical and sweep questions the halves of xor, each answerable from one modality. An xor
label has no first-order correlation with either input alone, so a gradient on xor answers
alone cannot teach the model to read either half: the halves are asked on their own so
that the fused questions only have to compose features the model already reads. (Measured
on the tiny preset: with 2 slots and the timing questions binding rose from chance to 0.7,
while xor, whose audio half was never asked, stayed at chance. docs/notes/mimo-tuning.md.)

The timing questions hear one beep, not a high and a low one of which the question names
one: that answer is the xor of the asked word and the order of the pitches, the same trap
as xor's with no half asked on its own. Measured (tiny preset, "when was" questions only,
200 steps): two tones and the asked pitch drawn, loss stuck at chance throughout; two
tones always asking the high one, or one beep, train accuracy 1.00 by step 50.

Every sample names its question template under "question" (the keys of QUESTIONS), and
LABELS lists the "kind/question" labels that per-question eval accuracy reports.

Held out of "train" (and drawn as often as any other combination in "eval"): moving shapes
whose (colour, direction) is in HELD_OUT_MOVES, and flashing colour pairs in HELD_OUT_PAIRS.
Train never shows them in any role, distractors included, so eval accuracy on the samples
where `held_out(ex["latent"])` holds measures composition of seen colours and motions. The
held-out moves are one per colour and all horizontal: a held-out vertical move would make
colour predict direction in the up-or-down draws of "vertical", "sweep" and "xor" (with
(red, up) held out, every red shape in them moved down), a shortcut that scores in train
and fails on exactly the held-out samples. Train keeps every colour equally often, and
left and right equally often; the pairs are a perfect matching of the four colours.

Each sample carries its latent factors under "latent" (see `draw_scene`) so that tests and
analyses can check these properties. Sample i of a split is a pure function of
(seed, split, i): no files, no downloads, identical on every host.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mm_jax.data.synthetic import COLOURS as RGB
from mm_jax.data.synthetic import COUNTS, SPLITS
from mm_jax.data.text import AUDIO_TAG, VIDEO_TAG

KINDS = ("video", "audio", "binding", "xor")
COLOURS = ("red", "green", "blue", "yellow")  # the four most distinct of synthetic.COLOURS
DIRECTIONS = ("up", "down", "left", "right")
PITCHES = {"low": 300.0, "high": 1500.0}  # Hz
CHIRPS = ("rising", "falling")
SLOT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")  # time k
HELD_OUT_MOVES = frozenset({("red", "left"), ("green", "right"), ("blue", "right"),
                            ("yellow", "left")})
HELD_OUT_PAIRS = frozenset({frozenset({"red", "blue"}), frozenset({"green", "yellow"})})
QUESTIONS = {
    "colour": "what colour is the moving shape ?".split(),
    "direction": "which way does the shape move ?".split(),
    "vertical": "does the shape move up or down ?".split(),
    "pitch": "is the tone high or low ?".split(),
    "count": "how many beeps ?".split(),
    "flash_at": "what colour flashed at time {} ?".split(),  # {}: a slot word
    "tone_when": "when was the beep ?".split(),
    "sweep": "does the sound rise or fall ?".split(),
    "binding": "which colour flashed during the beep ?".split(),
    "xor": "do the shape and the sound go the same way ?".split(),
}
WORDS = tuple(sorted({w for q in QUESTIONS.values() for w in q if w != "{}"}
                     | set(COLOURS) | set(DIRECTIONS) | set(PITCHES) | set(COUNTS[:3])
                     | set(SLOT_WORDS) | set(CHIRPS)
                     | {"yes", "no"}))
TEMPLATES = {"video": ("colour", "direction", "vertical", "flash_at"),
             "audio": ("pitch", "count", "tone_when", "sweep"),
             "binding": ("binding",), "xor": ("xor",)}
# Per-question eval labels: "kind/question", or just the kind where it has one question.
LABELS = tuple(k if len(t) == 1 else f"{k}/{q}" for k, t in TEMPLATES.items() for q in t)
AMPLITUDE, NOISE = 0.5, 0.005  # tones ~40 dB above the noise floor: clean, never silent


def _pick(rng: np.random.Generator, options) -> str:
  options = tuple(options)
  return options[int(rng.integers(len(options)))]


def held_out(latent: dict) -> bool:
  """Whether a sample shows a combination that split "train" never contains."""
  pair = frozenset(c for c, _ in latent["flashes"])
  return latent["moving"] in HELD_OUT_MOVES or pair in HELD_OUT_PAIRS


def _move(rng, split: str, directions=DIRECTIONS) -> tuple[str, str]:
  """(colour, direction) of a moving shape. Train redraws held-out ones: since those are one
  per colour, colours stay uniform (and up/down draws never redraw)."""
  while True:
    move = (_pick(rng, COLOURS), _pick(rng, directions))
    if split != "train" or move not in HELD_OUT_MOVES:
      return move


def _pair(rng, split: str) -> list[str]:
  """Two different colours in random order; train redraws held-out pairs."""
  while True:
    pair = [str(c) for c in rng.choice(COLOURS, 2, replace=False)]
    if split != "train" or frozenset(pair) not in HELD_OUT_PAIRS:
      return pair


def _beeps(rng, num_slots: int, pitch: str | None = None) -> tuple:
  """One to three tones in distinct slots, all of `pitch` (None: each pitch at random)."""
  count = int(rng.integers(1, min(3, num_slots) + 1))
  slots = sorted(int(s) for s in rng.choice(num_slots, count, replace=False))
  return tuple((pitch or _pick(rng, PITCHES), s) for s in slots)


def _fill(template: str, word: str) -> list[str]:
  return [word if w == "{}" else w for w in QUESTIONS[template]]


def _two_slots(rng, num_slots: int) -> list[int]:
  return [int(s) for s in rng.choice(num_slots, 2, replace=False)]


def _video(latent: dict, rng, split: str, num_slots: int, template: str | None = None
           ) -> tuple[str, list, list]:
  template = template or _pick(rng, TEMPLATES["video"])
  if rng.integers(2):  # the sound is a distractor here
    latent["chirp"] = _pick(rng, CHIRPS)
  else:
    latent["tones"] = _beeps(rng, num_slots)
  if template != "flash_at":
    latent["moving"] = _move(rng, split, ("up", "down") if template == "vertical" else
                            DIRECTIONS)
    return template, QUESTIONS[template], [latent["moving"][template != "colour"]]
  latent["flashes"] = tuple(zip(_pair(rng, split), _two_slots(rng, num_slots), strict=True))
  colour, slot = latent["flashes"][int(rng.integers(2))]
  return template, _fill("flash_at", SLOT_WORDS[slot]), [colour]


def _audio(latent: dict, rng, split: str, num_slots: int, template: str | None = None
           ) -> tuple[str, list, list]:
  template = template or _pick(rng, TEMPLATES["audio"])
  if template == "sweep":  # xor's audio half, with xor's kind of distractor motion
    latent["moving"] = _move(rng, split, ("up", "down"))
    latent["chirp"] = _pick(rng, CHIRPS)
    return template, QUESTIONS["sweep"], [latent["chirp"]]
  latent["moving"] = _move(rng, split)  # a distractor
  if template == "tone_when":
    slot = int(rng.integers(num_slots))
    latent["tones"] = ((_pick(rng, PITCHES), slot),)
    return template, QUESTIONS["tone_when"], [SLOT_WORDS[slot]]
  latent["tones"] = _beeps(rng, num_slots, _pick(rng, PITCHES))
  if template == "pitch":
    return template, QUESTIONS["pitch"], [latent["tones"][0][0]]
  return template, QUESTIONS["count"], [COUNTS[len(latent["tones"]) - 1]]


def _binding(latent: dict, rng, split: str, num_slots: int, template: str | None = None
             ) -> tuple[str, list, list]:
  # Colours, slots and which flash the beep joins are independent draws: given the
  # frames, either colour is the answer with probability 1/2.
  colours, slots = _pair(rng, split), _two_slots(rng, num_slots)
  latent["flashes"] = tuple(zip(colours, slots, strict=True))
  beep = int(rng.integers(2))
  latent["tones"] = ((_pick(rng, PITCHES), slots[beep]),)
  return "binding", QUESTIONS["binding"], [colours[beep]]


def _xor(latent: dict, rng, split: str, num_slots: int, template: str | None = None
         ) -> tuple[str, list, list]:
  latent["moving"] = _move(rng, split, ("up", "down"))
  latent["chirp"] = _pick(rng, CHIRPS)
  return "xor", QUESTIONS["xor"], [_same_way(latent["moving"][1], latent["chirp"])]


def _same_way(direction: str, chirp: str) -> str:
  """xor's answer: yes for up with rising or down with falling."""
  return "yes" if (direction == "up") == (chirp == "rising") else "no"


def draw_scene(kind: str, rng, split: str, num_slots: int, template: str | None = None
               ) -> tuple[dict, str, list, list]:
  """(latent, question template, question words, answer words) of one `kind` sample, its
  template drawn uniformly from TEMPLATES[kind] unless given. latent:
  "moving": (colour, direction) | None; "flashes": ((colour, slot), ...);
  "tones": ((pitch, slot), ...); "chirp": "rising" | "falling" | None."""
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
  latent = {"moving": None, "flashes": (), "tones": (), "chirp": None}
  make = {"video": _video, "audio": _audio, "binding": _binding, "xor": _xor}[kind]
  template, question, answer = make(latent, rng, split, num_slots, template)
  return latent, template, list(question), answer


class Question(NamedTuple):
  """One question a scene answers: its template, words, answer words, and the scene's
  facts it reads ("colour" and "direction" of the moving shape, "chirp", "tones",
  "flash<slot>"). Two questions that read disjoint facts say nothing about each other's
  answers."""
  template: str
  words: list[str]
  answer: list[str]
  facts: frozenset[str]


def questions(latent: dict) -> list[Question]:
  """Every question that `latent`'s scene answers without ambiguity, whatever kind drew
  it: a distractor is a scene too (the beeps under a video question can be counted, the
  moving shape under an audio question has a colour). The tone questions all read the one
  fact "tones": any two of them constrain each other (a count of two rules out "when was
  the beep", which needs exactly one)."""
  out = []

  def ask(template, answer, *facts, word=None):
    words = QUESTIONS[template] if word is None else _fill(template, word)
    out.append(Question(template, list(words), [answer], frozenset(facts)))

  if latent["moving"] is not None:
    colour, direction = latent["moving"]
    ask("colour", colour, "colour")
    ask("direction", direction, "direction")
    if direction in ("up", "down"):
      ask("vertical", direction, "direction")
      if latent["chirp"] is not None:
        ask("xor", _same_way(direction, latent["chirp"]), "direction", "chirp")
  flashes = {slot: colour for colour, slot in latent["flashes"]}
  for slot, colour in sorted(flashes.items()):
    ask("flash_at", colour, f"flash{slot}", word=SLOT_WORDS[slot])
  if latent["tones"]:
    ask("count", COUNTS[len(latent["tones"]) - 1], "tones")
    if len({p for p, _ in latent["tones"]}) == 1:
      ask("pitch", latent["tones"][0][0], "tones")
    if len(latent["tones"]) == 1:  # "when was the beep ?" needs exactly one
      (_, slot), = latent["tones"]
      ask("tone_when", SLOT_WORDS[slot], "tones")
      if slot in flashes:
        ask("binding", flashes[slot], "tones", f"flash{slot}")
  if latent["chirp"] is not None:
    ask("sweep", latent["chirp"], "chirp")
  return out


def _more_turns(latent: dict, first: list[str], turns: int, rng) -> list[tuple[list, list]]:
  """Up to `turns - 1` further (question, answer) pairs, in random order, none reading a
  fact an earlier question read: a later answer that followed from earlier ones (direction
  from "up or down", xor from both halves) could be read off the text instead of the
  media. (With every question asked, train accuracy reached 0.97 while first questions on
  motion stayed at chance; docs/notes/mimo-tuning.md has both variants.)"""
  scene = questions(latent)
  used = next(q.facts for q in scene if q.words == first)
  more = []
  for i in rng.permutation(len(scene)):
    q = scene[i]
    if len(more) < turns - 1 and not q.facts & used:
      more.append((q.words, q.answer))
      used |= q.facts
  return more


def draw_frames(latent: dict, rng, num_frames: int, size: int) -> np.ndarray:
  """uint8[F, S, S, 3]: the scene's shapes, frame f showing slot f."""
  frames = rng.integers(0, 30, (num_frames, size, size, 3)).astype(np.uint8)
  side = max(2, round(0.3 * size))
  if latent["moving"] is not None:
    colour, direction = latent["moving"]
    margin = 0.1 * size
    track = np.linspace(rng.uniform(0, margin), size - side - rng.uniform(0, margin), num_frames)
    if direction in ("up", "left"):  # row 0 is the top of the image
      track = track[::-1]
    across = rng.uniform(0, size - side)
    for f, along in enumerate(track):
      y, x = (along, across) if direction in ("up", "down") else (across, along)
      _square(frames[f], y, x, side, colour)
  for colour, slot in latent["flashes"]:
    _square(frames[slot], *rng.uniform(0, size - side, 2), side, colour)
  return frames


def _square(image: np.ndarray, y: float, x: float, side: int, colour: str) -> None:
  y, x = round(y), round(x)
  image[y:y + side, x:x + side] = RGB[colour]


def synth_audio(latent: dict, rng, num_samples: int, num_slots: int,
                sample_rate: int) -> np.ndarray:
  """float32[N]: the scene's tones and chirp over faint white noise."""
  wave = rng.normal(0.0, NOISE, num_samples)
  slot = num_samples // num_slots
  t = np.arange(num_samples) / sample_rate
  for pitch, s in latent["tones"]:
    # The middle 80% of the slot: gaps between adjacent beeps keep them countable.
    start, n = s * slot + slot // 10, slot - 2 * (slot // 10)
    phase = 2 * np.pi * (PITCHES[pitch] * t[:n] + rng.uniform())
    wave[start:start + n] += AMPLITUDE * _ramp(n, sample_rate) * np.sin(phase)
  if latent["chirp"] is not None:
    f0, f1 = PITCHES["low"], PITCHES["high"]
    if latent["chirp"] == "falling":
      f0, f1 = f1, f0
    # Linear sweep: phase = 2 pi * integral of f0 + (f1 - f0) t / D.
    duration = num_samples / sample_rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * duration) + rng.uniform())
    wave += AMPLITUDE * _ramp(num_samples, sample_rate) * np.sin(phase)
  return wave.astype(np.float32)


def _ramp(n: int, sample_rate: int) -> np.ndarray:
  """float[n] envelope with 5 ms raised-cosine edges: hard edges are clicks, which smear
  energy over every frequency and blur the pitch."""
  k = min(n // 2, int(0.005 * sample_rate))
  env = np.ones(n)
  edge = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
  env[:k], env[n - k:] = edge, edge[::-1]
  return env


def example(index: int, *, split: str, seed: int, frame_size: int, num_frames: int,
            sample_rate: int = 16000, clip_seconds: float = 1.0, turns: int = 1,
            only: tuple[str, ...] = ()) -> dict:
  """Sample `index` of `split`: {"id", "frames": uint8[F, S, S, 3], "waveform": float32[N],
  "prompt", "answer", "kind", "question", "latent", "turns"}, N = clip_seconds *
  sample_rate.

  "prompt" and "answer" are the first question, drawn by kind as the module docstring says;
  "kind" and "question" describe it. "turns" holds up to `turns - 1` more (question,
  answer) word lists about the same scene, each reading facts no earlier one read
  (`_more_turns`): more supervised answers for one pass over the media, which is most of a
  sample's cost. The first question is drawn as with turns=1 (and so are frames and
  sound), and it never follows another answer, so it stays a clean single-question sample.

  only: entries of LABELS; when given, the first question's label is drawn uniformly from
  them instead of the kind from KINDS (a curriculum's early samples, `data.curriculum`).
  """
  if turns < 1:
    raise ValueError(f"turns={turns}: a sample has at least its first question")
  if not 2 <= num_frames <= len(SLOT_WORDS):
    raise ValueError(f"num_frames={num_frames}: motion and binding need at least 2 slots, "
                     f"and time words exist for {len(SLOT_WORDS)}")
  unknown = set(only) - set(LABELS)
  if unknown:
    raise ValueError(f"unknown question labels {sorted(unknown)}; expected some of {LABELS}")
  rng = np.random.default_rng((seed, SPLITS[split], index))
  kind, _, template = _pick(rng, only).partition("/") if only else (_pick(rng, KINDS), "", "")
  latent, template, question, answer = draw_scene(kind, rng, split, num_frames,
                                                  template or None)
  frames = draw_frames(latent, rng, num_frames, frame_size)
  waveform = synth_audio(latent, rng, int(round(clip_seconds * sample_rate)), num_frames,
                         sample_rate)
  # Drawn last, so that turns=1 samples are the same as before more turns existed.
  more = _more_turns(latent, question, turns, rng) if turns > 1 else []
  return {"id": f"synthetic_av-{split}-{index}", "frames": frames, "waveform": waveform,
          "prompt": [VIDEO_TAG, AUDIO_TAG] + question, "answer": answer, "kind": kind,
          "question": template, "latent": latent, "turns": more}


def label(sample: dict) -> str:
  """The sample's entry of LABELS."""
  return sample["kind"] if len(TEMPLATES[sample["kind"]]) == 1 else \
      f"{sample['kind']}/{sample['question']}"
