import pytest
from conftest import mimo_config, tiny_config

from configs import llava
from mm_jax import config as config_lib
from mm_jax import run


@pytest.mark.parametrize("arg", ["tiny", "1b", "7b", "13b", "7b,stage=pretrain",
                                 "13b,stage=finetune", "tiny,stage=pretrain",
                                 "phi2", "phi2,stage=pretrain", "phi2,stage=finetune"])
def test_presets_parse(arg):
  cfg = config_lib.from_config_dict(llava.get_config(arg))
  assert cfg.stage == (arg.split("stage=")[1] if "stage=" in arg else "full")


def test_7b_dry_run_counts(capsys):
  counts = run.main(llava.get_config("7b,stage=pretrain"), None, dry=True)
  assert abs(counts["total"] - 7.06e9) / 7.06e9 < 0.01
  # Stage 1 trains the projector only: 1024*4096 + 4096 + 4096*4096 + 4096.
  assert counts["trainable"] == counts["projectors/image"] == 20_979_712
  assert counts["towers/image"] == 303_507_456  # CLIP ViT-L/14-336 as in transformers
  out = capsys.readouterr().out
  assert "trainable (stage=pretrain)" in out and "7.063B" in out


def test_phi2_dry_run_counts():
  counts = run.main(llava.get_config("phi2,stage=finetune"), None, dry=True)
  assert counts["decoder"] == 2_779_683_840  # microsoft/phi-2 (PhiForCausalLM)
  assert counts["towers/image"] == 85_799_424  # CLIP ViT-B/16 vision model
  # residual_mlp: 768*2560 + 2560 + 2 blocks * 2 * (2560*2560 + 2560).
  assert counts["projectors/image"] == 28_193_280
  assert counts["frozen"] == counts["towers/image"]


def test_finetune_freezes_only_the_tower():
  counts = run.main(llava.get_config("1b,stage=finetune"), None, dry=True)
  assert counts["frozen"] == counts["towers/image"]
  assert 1.0e9 < counts["decoder"] < 1.2e9  # TinyLlama-1.1B


@pytest.mark.parametrize("key,value,message", [
    ("optim.lr", -1.0, "config.optim.lr"),
    ("model.attention", "flash", "config.model.attention"),
    ("model.vision.feature_layer", 7, "config.model.vision.feature_layer"),
    ("model.decoder.kv_heads", 3, "config.model.decoder.heads"),
    ("optim.grad_accum", 5, "config.optim.grad_accum"),
    ("optim.freeze", ("[unclosed",), "config.optim.freeze[0]"),
    ("mesh.data", 0, "config.mesh"),
    ("stage", "pretrain", "config.stage"),
    ("data.turns", 0, "config.data.turns"),
    ("data.read_threads", -2, "config.data.read_threads"),
    ("data.curriculum", ("video/vertical",), "config.data.curriculum"),  # samples missing
])
def test_bad_values_name_the_key(key, value, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[")):
    tiny_config(**{key: value})


def test_unknown_and_mistyped_keys():
  with pytest.raises(config_lib.ConfigError, match=r"config.optim.learning_rate: unknown key"):
    config_lib.from_config_dict({"optim": {"learning_rate": 1.0}})
  with pytest.raises(config_lib.ConfigError, match=r"config.train.steps: expected an int"):
    config_lib.from_config_dict({"train": {"steps": "ten"}})


def test_config_arg_errors():
  with pytest.raises(ValueError, match="unknown preset"):
    llava.get_config("70b")
  with pytest.raises(ValueError, match="unknown stage"):
    llava.get_config("7b,stage=rlhf")


def test_overrides_are_type_checked():
  cd = llava.get_config("7b")
  cd.optim.lr = 3e-5
  assert config_lib.from_config_dict(cd).optim.lr == 3e-5
  with pytest.raises(TypeError):
    cd.optim.lr = "fast"


def test_curriculum_labels_are_checked():
  with pytest.raises(config_lib.ConfigError, match=r"config.data.curriculum: unknown labels"):
    mimo_config(**{"data.curriculum": ("video/teleport",), "data.curriculum_samples": 8})
  cfg = mimo_config(**{"data.curriculum": ("video/vertical", "xor"),
                       "data.curriculum_samples": 8})
  assert cfg.data.curriculum == ("video/vertical", "xor")
