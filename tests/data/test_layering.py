"""The data package reads one way: sources -> records -> pipeline (no import circle)."""

import subprocess
import sys


def test_no_source_imports_the_pipeline():
  code = ("import sys\n"
          "import mm_jax.data.coco, mm_jax.data.llava, mm_jax.data.synthetic, "
          "mm_jax.data.synthetic_av, mm_jax.data.records\n"
          "assert 'mm_jax.data.pipeline' not in sys.modules, 'a source imports the pipeline'\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
