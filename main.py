"""mm_jax entry point: flags -> config -> mm_jax.run.main.

  python main.py --config=configs/llava.py:tiny --workdir=/tmp/tiny
  python main.py --config=configs/llava.py:7b,stage=pretrain --dry_run
  python main.py --mode=generate --config=configs/llava.py:tiny --workdir=/tmp/tiny \
      --image=shape.png --prompt="what shape is it?"
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llava.py:tiny", "Run config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config.json.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "generate"], "What to do.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build abstractly, print parameter counts.")
_PROMPT = flags.DEFINE_string("prompt", "", "--mode=generate: the user's question.")
_IMAGE = flags.DEFINE_multi_string("image", [], "--mode=generate: image file(s), in order.")
_VIDEO = flags.DEFINE_multi_string("video", [], "--mode=generate: video file(s), in order.")
_AUDIO = flags.DEFINE_multi_string("audio", [], "--mode=generate: audio file(s), in order.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host GPU/TPU).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from mm_jax import config, run
  from mm_jax.data.errors import BadRecord
  from mm_jax.data.skips import DataError
  from mm_jax.infer.prompts import PromptError

  try:
    run.main(_CONFIG.value, _WORKDIR.value, _MODE.value, _DRY_RUN.value, prompt=_PROMPT.value,
             images=tuple(_IMAGE.value), videos=tuple(_VIDEO.value),
             audios=tuple(_AUDIO.value))
  except config.ConfigError as e:  # a bad value: name the key; no traceback, no flag help
    sys.exit(f"config error: {e}")
  except DataError as e:  # strict mode or too many bad records: the message says which
    sys.exit(f"data error: {e}")
  except (PromptError, BadRecord, FileNotFoundError) as e:  # --mode=generate inputs
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
