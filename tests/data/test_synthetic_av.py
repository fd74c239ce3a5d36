"""The embedded audio-video task in mm_jax.data.synthetic_av: determinism, shapes, the kind
mix, held-out combinations, and the fusion properties of "binding" and "xor"."""

import collections
import functools

import numpy as np
import pytest

from mm_jax.data import synthetic_av as av
from mm_jax.data.synthetic import COLOURS as RGB
from mm_jax.data.text import AUDIO_TAG, VIDEO_TAG, WordTokenizer

SIZE, FRAMES, SR = 32, 4, 16000


@functools.cache
def _samples(split: str, n: int) -> tuple[dict, ...]:
  return tuple(av.example(i, split=split, seed=0, frame_size=SIZE, num_frames=FRAMES)
               for i in range(n))


def _of_kind(kind: str, split: str = "train", n: int = 2000) -> list[dict]:
  return [ex for ex in _samples(split, n) if ex["kind"] == kind]


def _close(p: float, n: int, target: float = 0.5) -> bool:
  """p is an estimate of `target` from n samples: within 4 standard errors."""
  return abs(p - target) <= 4 * np.sqrt(target * (1 - target) / n)


def test_deterministic_per_seed_split_index():
  a = av.example(7, split="train", seed=3, frame_size=SIZE, num_frames=FRAMES)
  b = av.example(7, split="train", seed=3, frame_size=SIZE, num_frames=FRAMES)
  assert a["id"] == "synthetic_av-train-7"
  np.testing.assert_array_equal(a["frames"], b["frames"])
  np.testing.assert_array_equal(a["waveform"], b["waveform"])
  assert (a["prompt"], a["answer"], a["kind"], a["latent"]) == (
      b["prompt"], b["answer"], b["kind"], b["latent"])
  others = [av.example(7, split="eval", seed=3, frame_size=SIZE, num_frames=FRAMES),
            av.example(7, split="train", seed=4, frame_size=SIZE, num_frames=FRAMES),
            av.example(8, split="train", seed=3, frame_size=SIZE, num_frames=FRAMES)]
  assert all(not np.array_equal(a["waveform"], o["waveform"]) for o in others)


@pytest.mark.parametrize("frames,size,seconds", [(4, 32, 1.0), (2, 16, 0.5), (8, 48, 2.0)])
def test_shapes_dtypes_and_words(frames, size, seconds):
  for i in range(12):
    ex = av.example(i, split="train", seed=0, frame_size=size, num_frames=frames,
                    clip_seconds=seconds)
    assert ex["frames"].shape == (frames, size, size, 3) and ex["frames"].dtype == np.uint8
    assert ex["waveform"].shape == (int(seconds * SR),) and ex["waveform"].dtype == np.float32
    assert np.abs(ex["waveform"]).max() < 1.0
    assert ex["prompt"][:2] == [VIDEO_TAG, AUDIO_TAG] and ex["kind"] in av.KINDS
    assert set(ex["prompt"][2:] + ex["answer"]) <= set(av.WORDS)
    assert 1 <= len(ex["answer"]) <= 2
  assert list(av.WORDS) == sorted(set(av.WORDS))
  tok = WordTokenizer(av.WORDS, tags=(VIDEO_TAG, AUDIO_TAG))
  assert tok.unk_id not in tok.encode(" ".join(ex["prompt"] + ex["answer"]))
  with pytest.raises(ValueError, match="num_frames"):
    av.example(0, split="train", seed=0, frame_size=size, num_frames=1)


def test_kind_mix_is_uniform():
  counts = collections.Counter(ex["kind"] for ex in _samples("train", 400))
  assert set(counts) == set(av.KINDS)
  assert all(_close(counts[k] / 400, 400, 0.25) for k in av.KINDS), counts


def test_held_out_only_in_eval():
  train, held = _samples("train", 2000), [ex for ex in _samples("eval", 400)
                                          if av.held_out(ex["latent"])]
  assert not any(av.held_out(ex["latent"]) for ex in train)
  assert not {ex["latent"]["moving"] for ex in train} & av.HELD_OUT_MOVES
  # Every held-out combination shows up in eval, and train still has every colour/direction.
  assert {ex["latent"]["moving"] for ex in held} >= av.HELD_OUT_MOVES
  assert {frozenset(c for c, _ in ex["latent"]["flashes"]) for ex in held} >= av.HELD_OUT_PAIRS
  assert {ex["latent"]["moving"][1] for ex in train if ex["latent"]["moving"]} == set(
      av.DIRECTIONS)


def test_colour_does_not_predict_vertical_motion_in_train():
  # xor, "vertical" and "sweep" draw up or down only: there, in train, each colour must
  # move up half the time, or colour would stand in for the motion the model must see.
  vertical = collections.defaultdict(list)
  for ex in _samples("train", 2000):
    if ex["kind"] == "xor" or ex.get("question") in ("vertical", "sweep"):
      colour, direction = ex["latent"]["moving"]
      vertical[colour].append(direction == "up")
  assert set(vertical) == set(av.COLOURS)
  for colour, up in vertical.items():
    assert _close(np.mean(up), len(up)), (colour, np.mean(up), len(up))


def test_xor_answer_independent_of_each_modality():
  xor = _of_kind("xor")
  for ex in xor:  # the exact 2x2 construction
    same = (ex["latent"]["moving"][1] == "up") == (ex["latent"]["chirp"] == "rising")
    assert ex["answer"] == ["yes" if same else "no"]
    assert not ex["latent"]["tones"] and not ex["latent"]["flashes"]
  factors = {"direction": lambda lt: lt["moving"][1], "colour": lambda lt: lt["moving"][0],
             "chirp": lambda lt: lt["chirp"]}
  for name, factor in factors.items():
    groups = collections.defaultdict(list)
    for ex in xor:
      groups[factor(ex["latent"])].append(ex["answer"] == ["yes"])
    for value, yes in groups.items():
      assert _close(np.mean(yes), len(yes)), (name, value, np.mean(yes), len(yes))


def test_binding_needs_both_modalities():
  binding = _of_kind("binding")
  earlier = []
  for ex in binding:
    (c1, s1), (c2, s2) = ex["latent"]["flashes"]
    (_, slot), = ex["latent"]["tones"]  # one beep, during one of the flashes
    assert c1 != c2 and s1 != s2 and slot in (s1, s2)
    for colour, s in ex["latent"]["flashes"]:  # both colours are on screen
      assert (ex["frames"][s] == RGB[colour]).all(-1).sum() > 0
    assert ex["answer"] == [c1 if slot == s1 else c2]
    earlier.append(ex["answer"] == [c1 if s1 < s2 else c2])
  # From video alone (which colour flashed first) the answer is a coin flip.
  assert _close(np.mean(earlier), len(earlier))
  # From audio alone (the beep's slot and pitch) every colour is possible.
  by_sound = collections.defaultdict(set)
  for ex in binding:
    by_sound[ex["latent"]["tones"]].add(ex["answer"][0])
  assert len(by_sound) == 2 * FRAMES
  assert all(colours == set(av.COLOURS) for colours in by_sound.values())


def _peak_hz(segment: np.ndarray) -> float:
  spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment))))
  return float(np.fft.rfftfreq(len(segment), 1 / SR)[spectrum.argmax()])


def test_tone_slots_peak_at_their_pitch_and_silence_elsewhere():
  slot = SR // FRAMES
  tonal = [ex for ex in _of_kind("audio") if ex["latent"]["chirp"] is None]  # not "sweep"
  for ex in _of_kind("binding")[:20] + tonal[:20]:
    wave = ex["waveform"]
    toned = dict((s, p) for p, s in ex["latent"]["tones"])
    for s in range(FRAMES):
      segment = wave[s * slot:(s + 1) * slot]
      if s in toned:
        assert abs(_peak_hz(segment) - av.PITCHES[toned[s]]) < 10
      else:
        assert np.abs(segment).max() < 0.05


def test_chirp_rises_or_falls():
  quarter = SR // 4
  for ex in _of_kind("xor")[:20]:
    peaks = [_peak_hz(ex["waveform"][q * quarter:(q + 1) * quarter]) for q in range(4)]
    expected = sorted(peaks, reverse=ex["latent"]["chirp"] == "falling")
    assert peaks == expected and abs(peaks[0] - peaks[-1]) > 600, peaks


def test_moving_shape_centroid_is_monotone():
  moving = [ex for ex in _of_kind("video") if ex["latent"]["moving"]]
  for ex in moving[:30] + _of_kind("xor")[:30]:
    colour, direction = ex["latent"]["moving"]
    axis = 0 if direction in ("up", "down") else 1
    centroids = []
    for frame in ex["frames"]:
      mask = (frame == RGB[colour]).all(-1)
      assert mask.sum() >= 16  # big and bold: at least a 4x4 block
      centroids.append(np.argwhere(mask)[:, axis].mean())
    steps = np.diff(centroids) * (1 if direction in ("down", "right") else -1)
    assert (steps > 1).all(), (direction, centroids)
    across = [np.argwhere((f == RGB[colour]).all(-1))[:, 1 - axis].mean() for f in ex["frames"]]
    assert np.ptp(across) < 1e-6  # moves along one axis only


def test_video_and_audio_answers_match_latent():
  templates = collections.Counter()
  for ex in _of_kind("video")[:200]:
    question = " ".join(ex["prompt"][2:])
    if "flashed at time" in question:  # the slot asked about, read from the frames alone
      templates["flash_at"] += 1
      (c1, s1), (c2, s2) = ex["latent"]["flashes"]
      assert c1 != c2 and s1 != s2 and ex["latent"]["moving"] is None
      slot = av.SLOT_WORDS.index(ex["prompt"][-2])
      assert slot in (s1, s2) and ex["answer"] == [c1 if slot == s1 else c2]
      assert (ex["frames"][slot] == RGB[ex["answer"][0]]).all(-1).sum() > 0
      continue
    templates[ex["question"]] += 1
    colour, direction = ex["latent"]["moving"]
    assert ex["answer"] == [colour if "colour" in ex["prompt"] else direction]
    if ex["question"] == "vertical":  # xor's video half: only up or down
      assert direction in ("up", "down")
  for ex in _of_kind("audio")[:200]:
    tones = ex["latent"]["tones"]
    if ex["question"] == "sweep":  # xor's audio half: the chirp's direction, no tones
      templates["sweep"] += 1
      assert ex["answer"] == [ex["latent"]["chirp"]] and not tones
      assert ex["latent"]["moving"][1] in ("up", "down")  # xor's distractor, not a cue
      continue
    if ex["prompt"][2] == "when":  # which slot held the beep, from sound alone
      templates["tone_when"] += 1
      (_, slot), = tones
      assert ex["answer"] == [av.SLOT_WORDS[slot]]
      continue
    pitches = {p for p, _ in tones}
    assert len(pitches) == 1 and 1 <= len(tones) <= 3
    want = pitches.pop() if "high" in ex["prompt"] else ("one", "two", "three")[len(tones) - 1]
    assert ex["answer"] == [want]
  assert len(templates) == 6 and min(templates.values()) > 20, templates


def test_question_labels():
  # Each sample names its template; its label is one of LABELS, and every label occurs.
  seen = collections.Counter(av.label(ex) for ex in _samples("train", 2000))
  assert set(seen) == set(av.LABELS) and min(seen.values()) > 50, seen
  for ex in _samples("train", 200):
    assert ex["question"] in av.TEMPLATES[ex["kind"]]
    words = av.QUESTIONS[ex["question"]]
    assert [w for w in words if w != "{}"] == [w for w, t in zip(ex["prompt"][2:], words,
                                                                  strict=True) if t != "{}"]


def test_timing_answers_cover_every_slot():
  # "at time k" and "when was" answers use every slot: neither is a constant to memorise.
  answers = collections.defaultdict(set)
  for ex in _of_kind("video") + _of_kind("audio"):
    if "time" in ex["prompt"] or ex["prompt"][2] == "when":
      answers[ex["kind"]].add(ex["prompt"][-2] if ex["kind"] == "video" else ex["answer"][0])
  assert answers == {k: set(av.SLOT_WORDS[:FRAMES]) for k in ("video", "audio")}


def test_questions_hold_the_first_question_and_answer_each_unambiguously():
  # The first question is one of the scene's questions, with the same answer; no question
  # appears twice (one answer each); every template is asked of some scene.
  seen = collections.Counter()
  for ex in _samples("train", 600) + _samples("eval", 200):
    qs = av.questions(ex["latent"])
    assert (ex["prompt"][2:], ex["answer"]) in [(q.words, q.answer) for q in qs]
    assert len({tuple(q.words) for q in qs}) == len(qs)
    seen.update(q.template for q in qs)
  assert set(seen) == set(av.QUESTIONS), seen


def test_questions_answers_follow_the_latent():
  latent = {"moving": None, "flashes": (("red", 0), ("blue", 2)),
            "tones": (("high", 2), ("low", 1), ("low", 3)), "chirp": None}
  got = {" ".join(q.words): (q.answer, set(q.facts)) for q in av.questions(latent)}
  assert got == {"what colour flashed at time one ?": (["red"], {"flash0"}),
                 "what colour flashed at time three ?": (["blue"], {"flash2"}),
                 # three beeps: "when was the beep ?" has no single answer
                 "how many beeps ?": (["three"], {"tones"})}
  latent = {"moving": None, "flashes": (("red", 0), ("blue", 2)), "tones": (("low", 2),),
            "chirp": None}
  got = {" ".join(q.words): (q.answer, set(q.facts)) for q in av.questions(latent)}
  assert got == {"what colour flashed at time one ?": (["red"], {"flash0"}),
                 "what colour flashed at time three ?": (["blue"], {"flash2"}),
                 "how many beeps ?": (["one"], {"tones"}),
                 "is the tone high or low ?": (["low"], {"tones"}),
                 "when was the beep ?": (["three"], {"tones"}),
                 "which colour flashed during the beep ?": (["blue"], {"tones", "flash2"})}
  latent = {"moving": ("green", "down"), "flashes": (), "tones": (), "chirp": "falling"}
  got = {q.template: q.answer for q in av.questions(latent)}
  assert got == {"colour": ["green"], "direction": ["down"], "vertical": ["down"],
                 "xor": ["yes"], "sweep": ["falling"]}


def _facts(ex: dict) -> list[frozenset]:
  by_words = {tuple(q.words): q.facts for q in av.questions(ex["latent"])}
  return [by_words[tuple(ex["prompt"][2:])]] + [by_words[tuple(q)] for q, _ in ex["turns"]]


def test_turns_add_questions_about_the_same_scene_that_leak_no_answer():
  lengths = collections.Counter()
  for i in range(200):
    one = av.example(i, split="train", seed=0, frame_size=SIZE, num_frames=FRAMES)
    many = av.example(i, split="train", seed=0, frame_size=SIZE, num_frames=FRAMES, turns=4)
    # The first question, frames and sound are those of a one-question sample.
    assert (one["prompt"], one["answer"], one["latent"], one["turns"]) == (
        many["prompt"], many["answer"], many["latent"], [])
    np.testing.assert_array_equal(one["waveform"], many["waveform"])
    np.testing.assert_array_equal(one["frames"], many["frames"])
    scene = [(q.words, q.answer) for q in av.questions(many["latent"])]
    assert all(t in scene for t in many["turns"]) and len(many["turns"]) <= 3
    # No two questions read one fact, so no answer follows from the others: "up or down"
    # never comes with "which way", nor xor with both of its halves.
    facts = _facts(many)
    assert sum(len(f) for f in facts) == len(frozenset().union(*facts))
    lengths[len(many["turns"])] += 1
  assert lengths[0] == 0 and lengths[2] > 40, lengths  # every scene has a second question
  with pytest.raises(ValueError, match="turns"):
    av.example(0, split="train", seed=0, frame_size=SIZE, num_frames=FRAMES, turns=0)


def test_only_draws_the_first_question_from_the_given_labels():
  only = ("video/direction", "xor")
  got = collections.Counter(
      av.label(av.example(i, split="train", seed=0, frame_size=SIZE, num_frames=FRAMES,
                          only=only)) for i in range(200))
  assert set(got) == set(only) and _close(got["xor"] / 200, 200), got
  with pytest.raises(ValueError, match="unknown question labels"):
    av.example(0, split="train", seed=0, frame_size=SIZE, num_frames=FRAMES, only=("video",))
