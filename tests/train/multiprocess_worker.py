"""One process of a multi-process CPU run (tests/train/test_multiprocess.py).

argv: coordinator_port process_id num_processes workdir. Each process owns 4 CPU devices.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "4"
os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402

port, pid, n, workdir = sys.argv[1:5]
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(n), process_id=int(pid))
jax.config.update("jax_default_matmul_precision", "highest")

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS), os.path.join(TESTS, "train")]
from conftest import tiny_config  # noqa: E402
from test_checkpoint import CFG  # noqa: E402

from mm_jax.train import loop  # noqa: E402

assert jax.device_count() == 4 * int(n) and jax.local_device_count() == 4
result = loop.train(tiny_config(**{**CFG, "train.steps": 6, "checkpoint.every": 3}), workdir)
print("RESULT", result["loss"], result["eval/loss"], flush=True)
