r"""Read a data set as a training run would, without building a model, and report it.

  python -m mm_jax.data.check --config=configs/llava.py:tiny \
      --config.data.source=llava_json --config.data.json=runs/shapes/train.json \
      --config.data.image_dir=runs/shapes --config.data.tokenizer=runs/shapes/tokenizer.json \
      [--config.data.seq_len=256 ...] [--limit=N] [--split=eval]

The config is the run's: `--config=` and `--config.<key>=` as main.py takes them, typed
and with the tokenizer's ids adopted by `run.resolve`. The records go through the run's
own code (data/survey.py: pipeline.source_examples, the skip filter, the packer), so the
skip reasons are those the run would count. Images are decoded, because the run's
decoder (media.decode_image) is what finds a truncated file; `--limit` bounds the time.

--split: `train` (default: data.json, shuffled and packed as the run does) or `eval`
(data.eval_json, or the synthetic eval split: one sample per row, as eval reads it); one
split per invocation. --limit: read only the first N records; default all of a file, and
1000 samples of a generated source (synthetic, synthetic_av).

Exit: 0 when the skipped fraction is <= data.max_skip_fraction (and, under data.strict,
nothing was skipped), 1 when above, 2 for a config error (a bad flag or key, a missing
file, an empty data set), each a single line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags
from ml_collections import config_flags

from mm_jax import cli

GENERATED_LIMIT = 1000  # samples read of a generated source when --limit is not given


def _parse(args: Sequence[str]):
  """(ConfigDict, limit, split) from the command line, the way main.py parses it."""
  fv = flags.FlagValues()
  argv = ["mm_jax.data.check", *args]
  holder = config_flags.DEFINE_config_file("config", cli.DEFAULT_CONFIG, "Run config.",
                                           flag_values=fv, sys_argv=argv)
  limit = flags.DEFINE_integer("limit", None, "Read only the first N records (default: all; "
                               f"{GENERATED_LIMIT} of a generated source).", lower_bound=1,
                               flag_values=fv)
  split = flags.DEFINE_enum("split", "train", ["train", "eval"], "train: data.json; eval: "
                            "data.eval_json (or the synthetic eval split).", flag_values=fv)
  fv(argv)
  cd = holder.value
  cd.to_dict()  # a config file that failed to load raises here
  return cd, limit.value, split.value


def _pct(values: list[int]) -> str:
  if not values:
    return "none"
  p = np.percentile(values, [50, 90, 99], method="higher")
  return f"p50 {p[0]}, p90 {p[1]}, p99 {p[2]}, max {max(values)}"


def _hist(values: list[int]) -> str:
  counts = np.bincount(values) if values else []
  return ", ".join(f"{n} ({c} samples)" for n, c in enumerate(counts) if c) or "none"


def _files(found_missing: dict[str, tuple[int, int]], source: str) -> list[str]:
  if source in ("synthetic", "synthetic_av"):
    return ["media files   none (generated in process)"]
  if source == "tfds":
    return ["media files   stored in data.tfds_dir; missing or corrupt ones show as skips"]
  if not found_missing:
    return ["media files   none referenced"]
  return [f"{m + ' files':13s} {f + n} referenced: {f} found, {n} missing"
          for m, (f, n) in found_missing.items()]


def report(cfg, spec, s, split: str) -> list[str]:
  """The report's lines, before the verdict."""
  d, seen, skipped = cfg.data, s.stats.seen, s.stats.skipped
  lines = [f"records       {seen} read, {seen - skipped} usable, {skipped} skipped "
           f"({skipped / max(seen, 1):.1%})"]
  lines += _files(s.files, d.source)
  for reason, n in sorted(s.stats.counts.items()):
    lines.append(f"  skipped {reason:17s} {n:6d}  e.g. {s.first[reason]}")
  lines.append(f"tokens/sample {_pct(s.lengths)} of {len(s.lengths)} rendered "
               f"(data.seq_len={d.seq_len}); over it: "
               f"{sum(n > d.seq_len for n in s.lengths)} ({s.truncated} truncated, "
               f"{s.too_long} skipped too_long)")
  for m, (_, slots, _) in spec.media().items():
    tokens = _pct(s.placeholders.get(m, []))
    lines.append(f"{m + ' tokens':13s} per sample (placeholders): {tokens}")
    lines.append(f"{m + 's':13s} per sample: {_hist(s.items.get(m, []))} "
                 f"(data.{m}s_per_sample={slots})")
  packed = "packed" if d.pack and split == "train" else "one sample per row"
  slots = ", ".join(f"{m} slots {s.slots_used.get(m, 0) / max(s.rows * n, 1):.1%}"
                    for m, (_, n, _) in spec.media().items())
  lines.append(f"packing       {seen - skipped} samples -> {s.rows} rows ({packed}, "
               f"batch {cfg.train.batch_size}); used: token slots "
               f"{s.tokens_used / max(s.rows * d.seq_len, 1):.1%}, {slots}")
  return lines


def verdict(data, stats) -> tuple[str, int]:
  """The closing line and the exit code, by the run's own threshold test (SkipStats.check)
  over the whole pass: training repeats its data, so one pass's fraction is the run's."""
  from mm_jax.data.skips import DataError

  seen, skipped = stats.seen, stats.skipped
  frac, limit = skipped / max(seen, 1), data.max_skip_fraction
  if data.strict and skipped:
    return (f"FAIL: {skipped} of {seen} records skipped and data.strict is set: the run "
            "stops at the first", 1)
  try:
    stats.check(limit, min_seen=1)
  except DataError:
    return (f"FAIL: {skipped} of {seen} records skipped ({frac:.1%}), more than "
            f"data.max_skip_fraction={limit:g}: the run would stop with a data error", 1)
  return (f"OK: {skipped} of {seen} records skipped ({frac:.1%}), within "
          f"data.max_skip_fraction={limit:g}", 0)


def main(args: Sequence[str]) -> int:
  """Prints the report; returns the exit code (module docstring)."""
  try:
    cd, limit, split = _parse(args)
  except Exception as e:  # noqa: BLE001 - one line naming the key or file, as main.py
    print(cli.explain(args, e), file=sys.stderr)
    return 2
  from mm_jax import run
  from mm_jax.config import ConfigError
  from mm_jax.data import survey
  from mm_jax.data.records import RowSpec

  try:
    cfg = run.resolve(cd, explicit=cli.explicit_keys(args))
    spec = RowSpec.create(cfg.data, cfg.model)
    if limit is None:
      limit = GENERATED_LIMIT if cfg.data.embedded else 0
    items, make = survey.open_source(cfg, spec, split, limit)
  except (ConfigError, OSError, ValueError) as e:
    print(f"config error: {cli._first_line(e)}", file=sys.stderr)
    return 2
  where = cfg.data.json if split == "train" else cfg.data.eval_json
  print(f"mm_jax data check: source={cfg.data.source} split={split} "
        f"{where if not cfg.data.embedded else ''}".rstrip() + f" ({len(items)} records)",
        flush=True)
  logging.disable(logging.WARNING)  # the skip filter's per-record lines: the report has them
  try:
    s = survey.survey(cfg, spec, split, items, make)
  finally:
    logging.disable(logging.NOTSET)
  line, code = verdict(cfg.data, s.stats)
  print("\n".join(report(cfg, spec, s, split) + [line]), flush=True)
  return code


if __name__ == "__main__":
  import os

  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no model, no accelerator: do not claim one
  sys.exit(main(sys.argv[1:]))
