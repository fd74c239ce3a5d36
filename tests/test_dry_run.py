"""The --dry_run memory table (mm_jax/train/memory.py): bytes per module from the abstract
state, optimizer bytes for trainables only, and the stated activation formula."""

import types

import jax
import numpy as np
import pytest
from conftest import tiny_config

from configs import llava
from mm_jax import config as config_lib
from mm_jax import run, sharding
from mm_jax.train import memory
from mm_jax.train import state as state_lib


def _table(cfg):
  built = state_lib.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  return memory.table(cfg, built.abstract)


def test_tiny_full_stage_counts_every_module():
  cfg = tiny_config()
  rows = _table(cfg)
  assert list(rows) == ["towers/image", "projectors/image", "decoder", "total"]
  counts = state_lib.param_counts(state_lib.build(
      cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1])).abstract)
  total = rows["total"]
  for name, r in rows.items():
    assert r.params == counts[name] and r.param_bytes == 4 * r.params  # float32
    assert r.trainable == r.params and r.grad_bytes == r.param_bytes
  # AdamW: mu and nu per parameter, plus int32 step counters in the total only.
  assert sum(r.opt_bytes for n, r in rows.items() if n != "total") == 2 * total.param_bytes
  assert 2 * total.param_bytes < total.opt_bytes <= 2 * total.param_bytes + 64
  assert all(r.act_bytes > 0 for r in rows.values())
  assert total.peak_bytes == (total.param_bytes + total.grad_bytes + total.opt_bytes
                              + total.act_bytes)


def test_frozen_modules_have_no_optimizer_state_or_backward_activations():
  rows = _table(tiny_config(**{"optim.freeze": (r"^towers/",)}))  # finetune's freeze
  assert rows["towers/image"].trainable == rows["towers/image"].opt_bytes == 0
  assert rows["towers/image"].act_bytes == 0  # no backward pass through a frozen tower
  assert rows["projectors/image"].act_bytes > 0 and rows["decoder"].act_bytes > 0


def test_decoder_activations_follow_the_stated_formula():
  cfg = tiny_config(**{"model.dtype": "bfloat16", "model.attention": "xla"})
  b, t, d, n, v = 32, 80, 128, 4, 128  # tiny: batch 32, seq_len 80, width 128, 4 heads
  one = (34 * b * t * d + 5 * n * b * t * t) * 2 // 2
  logits = 8 * b * t * v
  assert memory.activation_bytes(cfg, {"decoder"})["decoder"] == 2 * one + logits
  full = tiny_config(**{"model.dtype": "bfloat16", "model.attention": "pallas",
                        "model.remat": "full"})
  kept = b * t * d * 2
  assert memory.activation_bytes(full, {"decoder"})["decoder"] == (
      2 * kept + 34 * b * t * d + logits)
  # Deeper than tiny's 2 blocks: the rerun block's A dominates a shallow stack.
  by_mode = [memory.activation_bytes(tiny_config(**{
      "model.remat": mode, "model.attention": "pallas", "model.decoder.depth": 8}),
      {"decoder"})["decoder"] for mode in ("none", "dots", "full")]
  assert by_mode[0] > by_mode[1] > by_mode[2]  # none > dots > full


def test_quantised_leaves_count_as_stored():
  """An nf4 kernel counts two parameters per stored byte; its scales count bytes only."""
  abstract = types.SimpleNamespace(
      params={"projectors": {"image": {"w": jax.ShapeDtypeStruct((8, 4), np.float32)}}},
      frozen={"decoder": {"q": {"kernel_nf4": jax.ShapeDtypeStruct((32, 32), np.uint8),
                                "kernel_scale": jax.ShapeDtypeStruct((1, 32), np.float32)}}},
      opt_state=())
  rows = memory.table(tiny_config(), abstract)
  assert rows["decoder"].params == 64 * 32
  assert rows["decoder"].param_bytes == 32 * 32 + 4 * 32
  assert rows["total"].param_bytes == 32 * 32 + 4 * 32 + 4 * 32


@pytest.mark.parametrize("preset,params,limit", [("7b", 6_758_404_096, 4.3e9),
                                                  ("phi2", 2_791_480_320, 2.0e9)])
def test_qlora_decoder_fits_the_issue_budget(preset, params, limit):
  """Issue 8: with stage=finetune_qlora the stored decoder (NF4 linear layers with their
  float32 scales, bf16 embeddings, norms and adapters) stays under the budget. `params`
  is the decoder with rank-8 adapters as stage finetune_lora counts it in float."""
  cfg = config_lib.from_config_dict(llava.get_config(f"{preset},stage=finetune_qlora"))
  rows = _table(cfg)
  assert rows["decoder"].params == params  # the same parameters, stored smaller
  assert rows["decoder"].param_bytes < limit, rows["decoder"].param_bytes


@pytest.fixture(scope="module")
def pretrain_7b():
  cfg = config_lib.from_config_dict(llava.get_config("7b,stage=pretrain"))
  return cfg, _table(cfg)


def test_7b_pretrain_table(pretrain_7b, capsys):
  cfg, rows = pretrain_7b
  total = rows["total"]
  assert total.params == 7_062_902_784 and total.param_bytes == 4 * 7_062_902_784
  assert total.trainable == rows["projectors/image"].trainable == 20_979_712
  assert rows["projectors/image"].opt_bytes == 2 * 4 * 20_979_712
  assert rows["towers/image"].act_bytes == 0
  b, t, d, v = 128, 2048, 4096, 32000  # remat=full, attention=auto (flash): no t^2 term
  c = 512  # train.loss_chunk: float32 logits and their gradient for 512 positions at a time
  assert rows["decoder"].act_bytes == 32 * b * t * d * 2 + 34 * b * t * d + 8 * b * c * v
  lines = memory.format_table(cfg, rows)
  assert lines[0].startswith("memory (global, before sharding): micro-batch 128 x 2048")
  assert lines[-3].split()[:2] == ["decoder", "6,738,415,616"]
  assert lines[-2].split()[:4] == ["total", "7,062,902,784", "26.31", "GiB"]


def test_dry_run_prints_counts_then_the_table(capsys):
  run.dry_run(tiny_config())
  out = capsys.readouterr().out
  assert "trainable (stage=full)" in out and "memory (global, before sharding)" in out
  assert "peak estimate (params + grads + optimizer + activations):" in out
