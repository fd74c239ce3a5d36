"""Every launch command in docs/launch.md works as written.

`python -m launch.gke ...` lines are rendered and the manifest passes all three checks; the
main.py flags of every command (after `--`, or xpk's --command) parse against the real
config into a valid typed config.
"""

import pathlib
import re
import shlex

import pytest
import yaml
from absl import flags
from ml_collections import config_flags

from launch import gke, validate
from mm_jax import config as config_lib

DOC = pathlib.Path(__file__).parents[2] / "docs" / "launch.md"


def _commands() -> list[str]:
  blocks = re.findall(r"```\n(.*?)```", DOC.read_text(), flags=re.S)
  return [line for b in blocks for line in b.splitlines()
          if "main.py" in line or "launch." in line]


def _main_flags(argv: list[str]) -> list[str]:
  for a in argv:
    if a.startswith("--command="):
      return shlex.split(a.removeprefix("--command="))[2:]  # after `python main.py`
  return argv[argv.index("--") + 1:] if "--" in argv else []


def _parse_config(argv: list[str]) -> config_lib.Config:
  ours = [a for a in argv if re.match(r"--(no)?config(\.|=)", a)]
  assert ours and ours[0].startswith("--config="), argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  sys_argv=["main.py", *ours])
  fv(["main.py", *ours])
  return config_lib.from_config_dict(fv.config)


COMMANDS = _commands()


def test_the_page_has_the_commands_a_user_needs():
  kinds = {c.split()[0] if not c.startswith("python") else " ".join(c.split()[:3])
           for c in COMMANDS}
  assert {"python -m launch.gke", "python -m launch.local", "xpk"} <= kinds, kinds
  assert any("xm_launch.py" in c for c in COMMANDS)


@pytest.mark.parametrize("command", [c for c in COMMANDS if "main.py" in c or " -- " in c])
def test_main_flags_parse_against_the_real_config(command):
  _parse_config(_main_flags(shlex.split(command)))


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m launch.gke")])
def test_rendered_manifests_pass_every_check(command, tmp_path):
  argv = shlex.split(command)[3:]
  argv = [a for a in argv if not a.startswith("--out=")]
  spec, _ = gke.parse(argv)
  validate.all_checks(yaml.safe_load(gke.render(spec)), spec)
