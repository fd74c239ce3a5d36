"""Every `python main.py` command in docs/*.md parses against the real config: its
--config file and preset exist and every --config.* key is one (typos fail here, not for
the user). docs/launch.md's commands have their own, stronger test (tests/launch)."""

import pathlib
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from mm_jax import cli
from mm_jax import config as config_lib

DOCS = pathlib.Path(__file__).parents[1] / "docs"


def _commands() -> list[tuple[str, str]]:
  out = []
  for page in sorted(DOCS.glob("*.md")):
    text = page.read_text().replace("\\\n", " ")
    for line in re.findall(r"`(python main\.py [^`]+)`", text) + [
        x for b in re.findall(r"```(?:sh)?\n(.*?)```", text, flags=re.S) for x in b.splitlines()
        if x.startswith("python main.py")]:
      out.append((page.name, line))
  return out


COMMANDS = _commands()


def test_the_hf_page_has_a_command_per_starting_point():
  hf = " ".join(c for page, c in COMMANDS if page == "hf.md")
  for key in ("llava_from_hf", "vision_from_hf", "decoder_from_hf", "audio_from_hf",
              "data.tokenizer", "--mode=eval", "--print_config"):
    assert key in hf, key


def _config_of(command: str) -> config_lib.Config:
  """The typed config of a documented `python main.py ...` command, parsed with the real
  --config flag (its HF folders do not exist here: they would supply the tokenizer)."""
  argv = [a for a in shlex.split(command)[2:] if re.match(r"--(no)?config(\.|=)", a)]
  if not argv or not argv[0].startswith("--config="):
    # --mode=eval/generate on a workdir: its config.json, here the default config's keys.
    argv = [f"--config={cli.DEFAULT_CONFIG}", *argv]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  sys_argv=["main.py", *argv])
  fv(["main.py", *argv])
  values = config_lib.fill_defaults(fv.config.to_dict())
  if any(values["init"].values()) and not values["data"]["tokenizer"]:
    values["data"]["tokenizer"] = "/models/tokenizer.json"  # what the folder would supply
  return config_lib.from_config_dict(values)


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{i}" for i, (p, _) in
                                                        enumerate(COMMANDS)])
def test_a_documented_command_parses(page, command):
  _config_of(command)


def test_the_config_reference_is_generated_and_complete():
  """docs/config.md is what `python -m mm_jax.config.reference` prints, and every key of
  the typed config has a row with a meaning."""
  from mm_jax.config import reference

  page = (DOCS / "config.md").read_text()
  assert page == reference.render(), (
      "regenerate: python -m mm_jax.config.reference > docs/config.md")

  def keys(d, prefix=""):
    for k, v in d.items():
      yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

  rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \| .*? \| (.*) \|$",
                                                       page, flags=re.M)}
  for key in keys(config_lib.defaults()):
    assert rows.get(key, "").strip(), f"{key}: no meaning in docs/config.md"


BIG = [(p, c) for p, c in COMMANDS if re.search(r"--config=configs/\w+\.py:(?!tiny)", c)]


@pytest.mark.parametrize("page,command", BIG, ids=[f"{p}:{i}" for i, (p, _) in enumerate(BIG)])
def test_a_documented_big_preset_builds_in_a_dry_run(page, command):
  """Big presets are not trained in tests: each documented command of one builds its model
  abstractly and prints the memory estimate (`--dry_run --nomemory_plan`), here on 8 fake
  CPU devices."""
  from mm_jax import run

  assert run.dry_run(_config_of(command))["total"] > 0
