"""Generation with a KV cache: cached logits equal the full forward pass, batched prompts of
different lengths equal each prompt alone, and greedy ids equal transformers' `generate` on
a random small LLaVA (float32, one and two images)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mm_jax import config as config_lib
from mm_jax.infer.generate import Decoding, Generator, left_pad
from mm_jax.models.multimodal import MultimodalModel
from mm_jax.models.stack import Stack

TINY = config_lib.ModelConfig(
    vision=config_lib.VisionConfig(image_size=16, patch_size=4, width=32, depth=2, heads=4,
                                   mlp_dim=64, feature_layer=-1),
    decoder=config_lib.DecoderConfig(vocab_size=48, width=32, depth=2, heads=4, kv_heads=2,
                                     mlp_dim=64),
    image_token_id=48, attention="xla", merge="xla", dtype="float32")
PER_IMAGE = TINY.vision.tokens_per_image  # 16


def model(cfg=TINY, seed=0) -> MultimodalModel:
  return MultimodalModel(cfg, rngs=nnx.Rngs(seed))


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def prompt(rng, parts) -> list[int]:
  """parts: ints (that many random text ids) and "I" (one image's placeholders)."""
  ids = []
  for p in parts:
    ids += [TINY.image_token_id] * PER_IMAGE if p == "I" else list(rng.integers(3, 48, p))
  return ids


def batch_for(prompts, pixels, valid) -> dict:
  b = left_pad([np.asarray(p, np.int32) for p in prompts], pad_id=0)
  return {**b, "images": pixels, "image_valid": np.asarray(valid)}


def test_cached_logits_equal_full_forward():
  """Prefill + 6 decode steps reproduce the training-path logits at every position."""
  m = model()
  rng = np.random.default_rng(1)
  ids = prompt(rng, [2, "I", 3])
  gen = Generator(m, Decoding(max_new_tokens=6, stop_ids=()))
  pixels = images(1, 16)
  out = gen(batch_for([ids], pixels, [True]))[0]
  full = np.asarray(ids + out, np.int32)[None]
  batch = {"tokens": full, "positions": np.arange(full.shape[1])[None],
           "segment_ids": np.ones_like(full), "images": pixels, "image_valid": np.ones(1, bool)}
  logits = np.asarray(nnx.jit(lambda m, b: m(b))(m, batch))[0]
  # Greedy: each generated id is the argmax of the full pass at the position before it.
  np.testing.assert_array_equal(logits[len(ids) - 1:-1].argmax(-1), out)


def test_batched_prompts_equal_each_prompt_alone():
  m = model(seed=3)
  rng = np.random.default_rng(2)
  p1, p2, p3 = prompt(rng, [1, "I", 2]), prompt(rng, [3, "I", 5, "I", 9]), prompt(rng, [4])
  pixels = images(6, 16, seed=1)  # Mi = 2 slots per row
  valid = [True, False, True, True, False, False]
  gen = Generator(m, Decoding(max_new_tokens=5))
  together = gen(batch_for([p1, p2, p3], pixels, valid))
  for row, p in enumerate([p1, p2, p3]):
    alone = gen(batch_for([p], pixels[2 * row:2 * row + 2], valid[2 * row:2 * row + 2]))[0]
    assert together[row] == alone, row


def test_stop_ids_end_rows_and_pad_after():
  m = model(seed=4)
  rng = np.random.default_rng(3)
  ids = prompt(rng, [5])
  free = Generator(m, Decoding(max_new_tokens=8))(batch_for([ids], images(1, 16), [False]))[0]
  stop = free[2]
  first = free.index(stop)
  gen = Generator(m, Decoding(max_new_tokens=8, stop_ids=(stop,), pad_id=0))
  out = np.asarray(gen._fn(gen.state, batch_for([ids], images(1, 16), [False]),
                           jax.random.key(0)))[0]
  assert list(out[:first + 1]) == free[:first + 1]
  assert (out[first + 1:] == 0).all()


# ----------------------------------------------------------------------------- transformers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, IMAGE_TOKEN, EOS = 64, 63, 2


def hf_llava():
  from mm_jax.interop import hf_config as hc
  from mm_jax.interop import hf_mapping as hm

  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         image_size=28, patch_size=7)
  text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
                                  eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
  config = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                    image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                                    vision_feature_select_strategy="default")
  torch.manual_seed(0)
  ref = transformers.LlavaForConditionalGeneration(config).float().eval()
  # Matrices N(0, 4 / fan_in): at 1 / fan_in a random 2-layer LLaMA repeats one token
  # forever, which would test little.
  with torch.no_grad():
    for name, p in ref.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 and "norm" in name
              else torch.randn_like(p) * (0.1 if p.ndim == 1 else 2 * p[0].numel() ** -0.5))
  cfg = hc.model_config_from_hf_llava(ref.config.to_dict(), attention="xla", merge="xla")
  ours = nnx.eval_shape(lambda: MultimodalModel(cfg, rngs=nnx.Rngs(0)))
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  hm.load_flat_into(ours, hm.llava_to_mm(sd, cfg))
  return ref, ours, cfg


def test_greedy_matches_transformers_generate():
  ref, ours, cfg = hf_llava()
  per = cfg.vision.tokens_per_image
  rng = np.random.default_rng(5)
  text = lambda n: list(rng.integers(3, IMAGE_TOKEN, n))
  one = [1] + text(3) + [IMAGE_TOKEN] * per + text(4)
  two = [1] + text(2) + [IMAGE_TOKEN] * per + text(2) + [IMAGE_TOKEN] * per + text(5)
  pixels = rng.normal(size=(3, 3, 28, 28)).astype(np.float32)  # NCHW, 1 + 2 images
  n_new = 12
  want = []
  for ids, px in ((one, pixels[:1]), (two, pixels[1:])):
    with torch.no_grad():
      seq = ref.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(px),
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n_new, do_sample=False, eos_token_id=EOS,
                         pad_token_id=0)
    want.append(seq[0, len(ids):].tolist())
  batch = batch_for([one, two], pixels[[0, 0, 1, 2]].transpose(0, 2, 3, 1),
                    [True, False, True, True])
  with jax.default_matmul_precision("highest"):
    got = Generator(ours, Decoding(max_new_tokens=n_new, stop_ids=(EOS,)))(batch)
  assert got == [w[:len(g)] for w, g in zip(want, got, strict=True)] and \
      [len(g) for g in got] == [len(w) for w in want], (got, want)
  assert all(len(set(w)) > 3 for w in want), ("degenerate reference", want)


def test_greedy_generation_through_a_scanned_stack_equals_unrolled():
  """model.scan_layers: one [L, B, S, K, H] cache scanned with the layers gives the ids
  the unrolled model's per-layer caches give, prompts of different lengths batched."""
  rng = np.random.default_rng(3)
  prompts = [prompt(rng, [2, "I", 3]), prompt(rng, [5, "I", 1])]
  batch = batch_for(prompts, images(2, 16), [True, True])
  decoding = Decoding(max_new_tokens=6, stop_ids=())
  want = Generator(model(), decoding)(batch)
  scanned = model(dataclasses.replace(TINY, scan_layers=True))
  assert isinstance(scanned.decoder.layers, Stack)
  assert Generator(scanned, decoding)(batch) == want
