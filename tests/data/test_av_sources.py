"""LLaVA-format records with `<video>` / `<audio>` (and `<image>`) -> examples, through
llava_json and tfds: placeholder counts per clip, the video-soundtrack rule, bad media."""

import json

import numpy as np
import pytest
import soundfile
from conftest import mimo_config
from PIL import Image

from mm_jax.data import audio, export, llava, pipeline, skips, sources, templates, text, video
from mm_jax.data.errors import BadRecord

COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.uint8)


def _turns(human, gpt="It is red."):
  return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


RECORDS = [
  {"id": "mixed", "image": "pic.png", "video": "clip.mp4", "audio": "half.wav",
   "conversations": _turns("<image>\n<video>\n<audio>\nWhat colour comes first?")},
  {"id": "soundtrack", "video": ["clip.mp4"],  # no audio key: <audio> is the clip's track
   "conversations": _turns("<video><audio> What do you hear?", "A tone.")},
  {"id": "two_clips", "audios": ["half.wav", "short.wav"],  # Megatron's MIMO key
   "conversations": _turns("<audio> then <audio>: same?", "Yes.")},
  {"id": "broken", "video": "broken.mp4", "conversations": _turns("<video> Colour?")},
  {"id": "silent", "video": "silent.mp4", "conversations": _turns("<video><audio> Sound?")},
  {"id": "miscount", "audio": "half.wav", "conversations": _turns("<audio><audio> Same?")},
  {"id": "gone", "audio": "nope.wav", "conversations": _turns("<audio> Sound?")},
]
REASONS = {"broken": "corrupt_video", "silent": "corrupt_video", "miscount": "tag_mismatch",
           "gone": "missing_audio"}


def _tone(seconds: float) -> np.ndarray:
  t = np.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
  return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Media, records.json, a tokenizer.json trained on the records, and the tag ids."""
  root = tmp_path_factory.mktemp("av")
  frames = np.repeat(COLOURS, 5, axis=0)[:, None, None, :] * np.ones((1, 32, 32, 1), np.uint8)
  video.write_video(str(root / "clip.mp4"), frames, fps=5, waveform=_tone(4.0))  # 4 s
  video.write_video(str(root / "silent.mp4"), frames, fps=5)
  (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 64)
  soundfile.write(root / "half.wav", _tone(0.5), audio.SAMPLE_RATE)  # 50 log-mel frames
  soundfile.write(root / "short.wav", _tone(0.3), audio.SAMPLE_RATE)  # 30
  Image.new("RGB", (40, 20), (0, 0, 255)).save(root / "pic.png")
  (root / "records.json").write_text(json.dumps(RECORDS))
  corpus = [templates.VICUNA_V1_SYSTEM + " USER: ASSISTANT:"] + [
    t["value"] for r in RECORDS for t in r["conversations"]]
  export.train_tokenizer(str(root / "tokenizer.json"), corpus * 3, vocab_size=300)
  tok = text.load_tokenizer(str(root / "tokenizer.json"),
                            tags=(text.IMAGE_TAG, text.VIDEO_TAG, text.AUDIO_TAG))
  ids = {m: tok.tag_id(t) for m, t in (("image", text.IMAGE_TAG), ("video", text.VIDEO_TAG),
                                       ("audio", text.AUDIO_TAG))}
  return root, ids


def _config(root, ids, **overrides):
  return mimo_config(**{
    "model.modalities": ("image", "video", "audio"), "data.source": "llava_json",
    "data.json": str(root / "records.json"), "data.image_dir": str(root),
    "data.tokenizer": str(root / "tokenizer.json"), "data.seq_len": 400,
    "data.audios_per_sample": 2, "data.tfds_dir": str(root / "tfds"),
    "model.video.num_frames": 4,  # the 4 colours of the clips written above
    **{f"model.{m}_token_id": i for m, i in ids.items()}, **overrides})


def _examples(cfg) -> dict[str, dict]:
  spec = pipeline.RowSpec.create(cfg.data, cfg.model)
  items, make = llava.llava_examples(cfg.data, spec, split="train")
  out = {}
  for i in range(len(items)):
    ex = make(items[i])
    out[ex["id"] if skips.SKIP in ex else str(items[i]["id"])] = ex
  return out


def _count(ex, token_id) -> int:
  return int(np.sum(ex["tokens"] == token_id))


def test_records_with_video_audio_and_images_become_examples(folder):
  root, ids = folder
  cfg = _config(root, ids)
  spec = pipeline.RowSpec.create(cfg.data, cfg.model)
  got = _examples(cfg)
  mixed = got["mixed"]
  assert (_count(mixed, ids["image"]), _count(mixed, ids["video"]), _count(mixed, ids["audio"])
          ) == (spec.tokens_per_image, spec.tokens_per_video, 12)  # 50 frames -> 25 -> 12
  where = {m: np.flatnonzero(mixed["tokens"] == i) for m, i in ids.items()}
  assert where["image"].max() < where["video"].min() < where["video"].max() < where["audio"].min()
  assert mixed["images"].shape == (1, 32, 32, 3)
  assert mixed["video"].shape == (1, spec.num_frames, 32, 32, 3)  # 4 frames of 32 px
  colours = mixed["video"][0] * np.float32(spec.std) + np.float32(spec.mean)
  np.testing.assert_allclose(colours.mean(axis=(1, 2)), COLOURS / 255, atol=0.05)
  assert mixed["audio"].shape == (1, 100, 80) and mixed["audio_frames"].tolist() == [50]
  want = audio.log_mel(audio.load_audio(str(root / "half.wav")), n_mels=80)  # 16-bit PCM
  np.testing.assert_allclose(mixed["audio"][0, :50], want, atol=1e-5)
  assert not mixed["audio"][0, 50:].any()
  # The soundtrack: 4 s -> 400 frames, cut to data.audio_seq_len = 100 -> 25 placeholders.
  track = got["soundtrack"]
  assert (_count(track, ids["video"]), _count(track, ids["audio"])) == (spec.tokens_per_video, 25)
  assert track["audio_frames"].tolist() == [100] and track["video"].shape[0] == 1
  # One count per clip, in order: 50 frames -> 12 placeholders, 30 -> 7.
  two = got["two_clips"]
  runs = np.split(np.flatnonzero(two["tokens"] == ids["audio"]),
                  np.flatnonzero(np.diff(np.flatnonzero(two["tokens"] == ids["audio"])) > 1) + 1)
  assert [len(r) for r in runs] == [12, 7] and two["audio_frames"].tolist() == [50, 30]
  assert two["video"].shape == (0, 4, 32, 32, 3) and two["images"].shape == (0, 32, 32, 3)


def test_bad_media_are_skipped_with_their_reason(folder):
  root, ids = folder
  got = _examples(_config(root, ids))
  assert {rid: ex[skips.SKIP] for rid, ex in got.items() if skips.SKIP in ex} == REASONS
  assert "no audio track" in got["silent"]["message"]
  assert "2 <audio> tags for 1 audio files" in got["miscount"]["message"]


def test_parse_record_rules(folder):
  root, _ = folder
  sample = sources.parse_record(RECORDS[1], image_dir=str(root))
  assert sample.audio_from_video and sample.audios == ()
  assert [f.path for f in sample.videos] == [str(root / "clip.mp4")]
  with pytest.raises(BadRecord, match="2 <audio> tags for 1 videos' audio tracks"):
    sources.parse_record({**RECORDS[1], "conversations": _turns("<video><audio><audio>")},
                         image_dir=str(root))
  with pytest.raises(BadRecord, match="both 'audio' and 'audios'") as e:
    sources.parse_record({**RECORDS[2], "audio": "half.wav"}, image_dir=str(root))
  assert e.value.reason == "bad_json"


def test_placeholder_ids_are_checked_per_modality(folder):
  root, ids = folder
  cfg = _config(root, ids, **{"model.audio_token_id": ids["audio"] + 5})
  with pytest.raises(Exception, match=r"config.model.audio_token_id: .* --config.model."
                     rf"audio_token_id={ids['audio']}"):
    llava.tokenizer_for(cfg.data, cfg.model)


def test_tfds_carries_video_and_audio(folder, tmp_path):
  root, ids = folder
  subset = [r for r in RECORDS if r["id"] in ("mixed", "soundtrack", "silent")]
  (tmp_path / "three.json").write_text(json.dumps(subset))
  json_got = _examples(_config(root, ids, **{"data.json": str(tmp_path / "three.json")}))
  tfds_got = _examples(_config(root, ids, **{"data.json": str(tmp_path / "three.json"),
                                             "data.source": "tfds",
                                             "data.tfds_dir": str(tmp_path / "tfds")}))
  assert set(tfds_got) == set(json_got) == {"mixed", "soundtrack", "silent"}
  assert tfds_got["silent"][skips.SKIP] == "corrupt_video"
  assert "silent.mp4" in tfds_got["silent"]["message"]  # the path, not "<bytes>"
  for rid in ("mixed", "soundtrack"):
    assert set(tfds_got[rid]) == set(json_got[rid])
    for key, value in json_got[rid].items():
      np.testing.assert_array_equal(tfds_got[rid][key], value, err_msg=f"{rid} {key}")


def test_synthetic_av_train_rows_answer_several_questions_eval_rows_one():
  cfg = mimo_config(**{"data.turns": 3})
  spec = pipeline.RowSpec.create(cfg.data, cfg.model)
  for split, most in (("train", 3), ("eval", 1)):
    items, make = pipeline.synthetic_av_examples(cfg.data, spec, split=split)
    runs = []
    for i in range(40):
      ex = make(items[i])
      assert skips.SKIP not in ex, ex
      mask = np.asarray(ex["loss_mask"], int)
      runs.append(int((np.diff(mask) == 1).sum() + mask[0]))  # answer + <eos> runs
    assert max(runs) == most and min(runs) >= min(2, most), (split, runs)


def test_synthetic_av_curriculum_asks_its_questions_first_then_the_mix():
  from mm_jax.data import synthetic_av

  cfg = mimo_config(**{"data.curriculum": ("video/vertical",), "data.curriculum_samples": 8,
                       "train.batch_size": 4})
  spec = pipeline.RowSpec.create(cfg.data, cfg.model)
  items, make = pipeline.synthetic_av_examples(cfg.data, spec, split="train")
  kinds = [synthetic_av.LABELS[make(items[i])["kind"].item()] for i in range(40)]
  assert kinds[:8] == ["video/vertical"] * 8 and len(set(kinds[8:])) > 3, kinds
  # Unshuffled, so the first two batches are those eight samples.
  it = pipeline.train_iterator(cfg.data, spec, global_batch=4, seed=0)
  question = pipeline.av_tokenizer().encode(synthetic_av.QUESTIONS["vertical"])
  for _ in range(2):
    for row in next(it)["tokens"]:
      windows = np.lib.stride_tricks.sliding_window_view(row, len(question))
      assert (windows == question).all(-1).any(), row
  eval_items, eval_make = pipeline.synthetic_av_examples(cfg.data, spec, split="eval")
  assert len({eval_make(eval_items[i])["kind"].item() for i in range(8)}) > 1
