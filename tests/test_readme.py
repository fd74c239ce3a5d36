"""The README's two opening commands stay true: CI runs the test one verbatim."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands():
  readme = open(os.path.join(ROOT, "README.md")).read()
  return re.findall(r"```\n(.+?)\n```", readme)[:2]


def test_readme_opens_with_install_run_and_test_commands():
  run, test = _commands()
  assert "pip install" in run and "main.py --config=configs/llava.py:tiny" in run
  assert "'.[test]'" in test and "pytest" in test


def test_ci_runs_the_readme_test_command():
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert _commands()[1] in ci
