"""The data iterator's position when a run resumes on another number of processes.

grain saves one iterator state per process (`data/process_<i>-of-<n>.json`). Process i
reads samples i, i+n, i+2n, ... of the shuffled stream (pipeline.py), so after s steps of
one sample per row every process sits at the same index, s * batch / n, and the run has
consumed s * batch samples whatever n was. Resuming on n' processes puts every process at
s * batch / n': exactly the samples an uninterrupted run would read next (a global batch
holds the same samples in another row order, and the loss is a sum over rows).

When processes stand at different indices (records skipped as bad, or packing several
samples per row), no exact position exists on n' processes: the total consumed is split
evenly, and a line says so (a few samples may repeat or be missed once).
"""

from __future__ import annotations

import json
import re

from mm_jax import paths
from mm_jax.train import metrics as metrics_lib

_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")
_COUNTS = ("next_index", "seen", "counter")  # per-process sample counts in grain's states


def saved_process_count(data_dir: str) -> int | None:
  """n of the `process_<i>-of-<n>.json` files in a checkpoint's data/ folder."""
  if not paths.isdir(data_dir):
    return None
  counts = {int(m.group(2)) for f in paths.listdir(data_dir) if (m := _FILE.match(f))}
  return counts.pop() if len(counts) == 1 else None


def _scaled(state, totals: dict, n_new: int):
  """`state` with every per-process count replaced by its share of `totals` on `n_new`
  processes."""
  if not isinstance(state, dict):
    return state
  return {k: totals[k] // n_new if k in _COUNTS and isinstance(v, int)
          else _scaled(v, totals.get(k, {}), n_new) for k, v in state.items()}


def _sum_counts(states: list[dict]) -> dict:
  """{key: sum over processes} for the count keys, nested as in the states."""
  out: dict = {}
  for k, v in states[0].items():
    if k in _COUNTS and isinstance(v, int):
      out[k] = sum(s[k] for s in states)
    elif isinstance(v, dict):
      out[k] = _sum_counts([s[k] for s in states])
  return out


def resharded_state(data_dir: str, n_new: int, process_index: int) -> dict:
  """The iterator state for process `process_index` of `n_new`, from the states that
  `n_old` processes saved in `data_dir`."""
  n_old = saved_process_count(data_dir)
  states = []
  for i in range(n_old):
    states.append(json.loads(paths.read_text(
        paths.join(data_dir, f"process_{i}-of-{n_old}.json"))))
  exact = all(s == states[0] for s in states) and not _has_partial_row(states[0])
  if not exact:
    metrics_lib.log(f"data position: {n_old} processes stood at different places; split "
                    f"evenly over {n_new} (a few samples may repeat or be missed once)")
  del process_index  # every process gets the same share
  return _without_partial_row(_scaled(states[0], _sum_counts(states), n_new))


def _has_partial_row(state) -> bool:
  if isinstance(state, dict):
    return bool(state.get("next_row", 0)) or any(_has_partial_row(v) for v in state.values())
  return False


def _without_partial_row(state):
  if isinstance(state, dict):
    return {k: 0 if k == "next_row" else _without_partial_row(v) for k, v in state.items()}
  return state
