"""--mode=generate (mm_jax.infer.chat): a model asked without a file of a modality it reads
says so in one warning line naming the flag."""

import logging

import pytest
from conftest import mimo_config, tiny_config

from mm_jax.infer import chat


@pytest.mark.parametrize("preset, files, line", [
    ("tiny", {}, "--mode=generate: no --image given, so the model answers from the text alone"),
    ("tiny", {"images": ["a.png"]}, None),
    ("mimo", {}, "--mode=generate: no --video or --audio given, so the model answers from the "
     "text alone"),
    ("mimo", {"videos": ["a.avi"]}, "--mode=generate: no --audio given, so the model answers "
     "from the text and video alone"),
    ("mimo", {"videos": ["a.avi"], "audios": ["a.wav"]}, None),
])
def test_a_missing_media_file_is_one_warning_naming_the_flag(caplog, preset, files, line):
  cfg = {"tiny": tiny_config, "mimo": mimo_config}[preset]()
  with caplog.at_level(logging.WARNING):
    assert chat.warn_missing_media(cfg, **files) == line
  assert [r.getMessage() for r in caplog.records] == ([line] if line else [])
