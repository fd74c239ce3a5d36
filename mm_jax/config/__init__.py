"""Typed, frozen run configuration: the ONE place an ml_collections ConfigDict becomes types.

`from_config_dict(cd)` walks the dataclasses (the model's groups in config/model.py, the
run's in config/run.py, the root `Config` here), rejects unknown keys, checks types and
values, and names the offending key (`config.optim.lr`) in every error. Modules receive
only the dataclass they need (e.g. `VisionConfig`), never the root config; all of them are
importable from `mm_jax.config`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from mm_jax.config.checks import ConfigError, _check
from mm_jax.config.model import (
  ATTENTION_IMPLS,
  DTYPES,
  MERGE_IMPLS,
  MODALITIES,
  REMAT,
  AudioConfig,
  DecoderConfig,
  ModelConfig,
  ProjectorConfig,
  VideoConfig,
  VisionConfig,
)
from mm_jax.config.run import (
  SOURCES,
  CheckpointConfig,
  DataConfig,
  EvalConfig,
  GenerateConfig,
  InitConfig,
  LoraConfig,
  MeshConfig,
  OptimConfig,
  TrainConfig,
)

__all__ = ["ATTENTION_IMPLS", "DTYPES", "MERGE_IMPLS", "MODALITIES", "REMAT", "SOURCES",
           "STAGES", "AudioConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "DecoderConfig", "EvalConfig", "GenerateConfig", "InitConfig", "LoraConfig",
           "MeshConfig", "ModelConfig", "OptimConfig", "ProjectorConfig", "TrainConfig",
           "VideoConfig", "VisionConfig", "defaults", "fill_defaults", "from_config_dict",
           "to_dict"]

STAGES = ("full", "pretrain", "finetune", "finetune_lora", "finetune_qlora")


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "tiny"  # the preset's name (set by the config file)
  stage: str = "full"  # full | pretrain | finetune | finetune_lora | finetune_qlora
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()
  init: InitConfig = InitConfig()
  generate: GenerateConfig = GenerateConfig()
  eval: EvalConfig = EvalConfig()
  lora: LoraConfig = LoraConfig()

  def validate(self, key: str = "config") -> None:
    _check(self.stage in STAGES, f"{key}.stage",
           f"must be {'|'.join(STAGES)}, got {self.stage!r}")
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if dataclasses.is_dataclass(value):
        value.validate(f"{key}.{f.name}")
    _check(self.stage == "full" or self.optim.freeze, f"{key}.stage",
           f"{self.stage} freezes modules but config.optim.freeze is empty; pick the stage in "
           "the config argument (configs/llava.py:7b,stage=pretrain), not by override")
    _check(not self.stage.endswith("lora") or self.lora.rank > 0, f"{key}.lora.rank",
           f"stage {self.stage} trains adapters: rank must be > 0")
    _check(self.stage != "finetune_qlora" or self.lora.base_qtype != "none",
           f"{key}.lora.base_qtype", "stage finetune_qlora needs a quantised base (int8|nf4)")
    _check(self.train.batch_size % self.optim.grad_accum == 0, f"{key}.optim.grad_accum",
           f"{self.optim.grad_accum} does not divide train.batch_size {self.train.batch_size}")
    _check(not self.init.audio_from_hf or "audio" in self.model.modalities,
           f"{key}.init.audio_from_hf", f"needs 'audio' in {key}.model.modalities "
           f"(got {self.model.modalities})")


def _coerce(value: Any, hint: Any, key: str) -> Any:
  """Returns `value` as type `hint`, or raises ConfigError naming `key`."""
  origin = typing.get_origin(hint)
  if dataclasses.is_dataclass(hint):
    _check(isinstance(value, Mapping), key, f"expected a group of fields, got {value!r}")
    return _build(hint, value, key)
  if origin is tuple:
    _check(isinstance(value, (tuple, list)), key, f"expected a tuple, got {value!r}")
    (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
    return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
  if origin in (typing.Union, types.UnionType):
    for arg in typing.get_args(hint):
      if arg is type(None) and value is None:
        return None
    hint = next(a for a in typing.get_args(hint) if a is not type(None))
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint is bool:
    _check(isinstance(value, bool), key, f"expected a bool, got {value!r}")
  elif hint is int:
    _check(isinstance(value, int) and not isinstance(value, bool), key,
           f"expected an int, got {value!r}")
  else:
    _check(isinstance(value, hint), key, f"expected {hint.__name__}, got {value!r}")
  return value


def _build(cls: type, values: Mapping[str, Any], key: str) -> Any:
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  _check(not unknown, f"{key}.{unknown[0]}" if unknown else key,
         f"unknown key (known: {', '.join(sorted(names))})")
  kwargs = {k: _coerce(v, hints[k], f"{key}.{k}") for k, v in values.items()}
  return cls(**kwargs)


def from_config_dict(cd: Any) -> Config:
  """ConfigDict (or plain nested dict) -> validated, frozen `Config`."""
  values = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
  config = _tokenizer_from_init(_build(Config, values, "config"))
  config.validate()
  return config


def _tokenizer_from_init(config: Config) -> Config:
  """An empty data.tokenizer defaults to the tokenizer shipped in the Hugging Face folder
  the language model comes from (init.llava_from_hf, else init.decoder_from_hf)."""
  folder = config.init.llava_from_hf or config.init.decoder_from_hf
  names = ("tokenizer.json", "tokenizer.model")
  if (config.data.tokenizer or not folder
      or not any(os.path.isfile(os.path.join(folder, n)) for n in names)):
    return config
  return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=folder))


def defaults() -> dict[str, Any]:
  """Every field of `Config` with its typed default, nested as the ConfigDict is: presets
  start from this and change what they tune, so any key can be overridden from any preset."""
  return dataclasses.asdict(Config())


def fill_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
  """`values` (a nested dict, maybe partial) over `defaults()`: every group and field."""
  def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
      out[k] = merge(base[k], v) if isinstance(base.get(k), dict) and isinstance(
          v, Mapping) else v
    return out

  return merge(defaults(), values)


def to_dict(config: Config) -> dict[str, Any]:
  """JSON-ready dict (written to workdir/config.json)."""
  return dataclasses.asdict(config)
