"""Goodput: what fraction of a run's wall time, across restarts, was productive training.

The training loop (process 0) appends one JSON object per line to WORKDIR/goodput.jsonl:

  {"time": <unix s at the call>, "event": <name>, "attempt": <id per process start>, ...}

  start            {"mode"}                          the attempt began (first event)
  init             {"dur_s"}                         fresh state, no checkpoint
  restore          {"step", "dur_s"}                 resumed from checkpoint `step`
  compile          {"dur_s"}                         compiling the train step
  train            {"first_step", "last_step",       steps first..last (1-based, inclusive)
                    "dur_s", "data_wait_s"}          took dur_s, data_wait_s of it in the iterator
  checkpoint_save  {"step", "dur_s"}                 the loop was blocked saving
  eval             {"step", "dur_s"}
  preempted        {"step"}                          a signal arrived; checkpoint `step` saved
  end              {"status", "step"}                finished | preempted | error | diverged

An event with dur_s is logged when its activity ends (`time` is the end); durations must not
overlap, i.e. a train window's dur_s excludes the saves and evals logged on their own. A
SIGKILLed attempt has no `end`: its last event is its end time.

`python -m mm_jax.goodput WORKDIR [--json]` prints the report (see `report` for its schema).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys
import time

from mm_jax import paths

FILENAME = "goodput.jsonl"
# fsync only where losing the line would misreport the attempt's boundaries or its ending.
_DURABLE = frozenset({"start", "end", "preempted"})
_BASE_KEYS = ("time", "event", "attempt")
# Numeric fields an event needs for the report; one without them counts as malformed.
_REQUIRED = {"init": ("dur_s",), "restore": ("step", "dur_s"), "compile": ("dur_s",),
             "train": ("first_step", "last_step", "dur_s", "data_wait_s"),
             "checkpoint_save": ("dur_s",), "eval": ("dur_s",)}
# Lost-time causes in report order; other event kinds with a dur_s get their own row.
CAUSES = ("startup", "init", "restore", "compile", "checkpoint_save", "eval", "data_wait",
          "replayed", "down")
# Event times are time.time() but durations come from the loop's monotonic clock, which NTP
# slewing lets drift apart by up to 500 ppm; reads add ~1 ms each. Within that, a negative
# remainder is jitter; beyond it the accounting double-counts time, which is a bug to show.
_SLEW = 5e-4
_READ_JITTER_S = 1e-3
_counter = itertools.count()


class Recorder:
  """Appends goodput events for one attempt (one process start) to WORKDIR/goodput.jsonl."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.attempt = _new_attempt_id()
    self._file = None
    if enabled:
      paths.makedirs(workdir)
      self.path = paths.join(workdir, FILENAME)
      self._file = paths.LineLog(self.path)  # a torn last line (SIGKILL mid-write) is ended

  def event(self, name: str, **fields) -> None:
    """Append {"time", "event", "attempt", **fields}; the three base keys win over fields."""
    if not self.enabled:
      return
    extra = {k: v for k, v in fields.items() if k not in _BASE_KEYS}
    record = {"time": time.time(), "event": name, "attempt": self.attempt, **extra}
    self._file.write(json.dumps(_jsonable(record), allow_nan=False), durable=name in _DURABLE)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def _new_attempt_id() -> str:
  # The counter keeps two recorders of one process apart (e.g. a resume test in one pytest).
  return f"{int(time.time())}-{os.getpid()}-{next(_counter)}"


def _jsonable(v):
  """Plain JSON values: numpy/jax scalars and arrays via tolist(), non-finite floats -> None."""
  if isinstance(v, dict):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if isinstance(v, float):
    return v if math.isfinite(v) else None
  if v is None or isinstance(v, (bool, int, str)):
    return v
  if hasattr(v, "tolist"):
    return _jsonable(v.tolist())
  return str(v)


# ---------------------------------------------------------------------------- reading


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid(e) -> bool:
  if not (isinstance(e, dict) and _is_num(e.get("time"))
          and isinstance(e.get("event"), str) and isinstance(e.get("attempt"), str)):
    return False
  return all(_is_num(e.get(k)) for k in _REQUIRED.get(e["event"], ()))


def read_events(path: str) -> tuple[list[dict], int]:
  """(valid events in file order, number of malformed lines skipped)."""
  events, bad = [], 0
  for line in paths.read_text(path, errors="replace").splitlines():
    if not line.strip():
      continue
    try:
      e = json.loads(line)
    except ValueError:
      e = None
    if _valid(e):
      events.append(e)
    else:
      bad += 1
  return events, bad


def _group(events: list[dict]) -> list[list[dict]]:
  """Events per attempt (file order within), attempts ordered by their first event time."""
  by_id: dict[str, list[dict]] = {}
  for e in events:
    by_id.setdefault(e["attempt"], []).append(e)
  return sorted(by_id.values(), key=lambda evs: min(e["time"] for e in evs))


# ---------------------------------------------------------------------------- accounting


def _resume_step(evs: list[dict]) -> int | None:
  """Checkpoint step the attempt resumed from (0 after init); None if it got neither."""
  for e in evs:
    if e["event"] == "restore":
      return int(e["step"])
    if e["event"] == "init":
      return 0
  return None


def _keep_limits(resumes: list[int | None]) -> list[int | None]:
  """Per attempt, the last of its steps that survives: the lowest step any later attempt
  resumed from (pairwise k+1 in the usual case; also right if a later one rolled further
  back or died before restoring). None: nothing later resumed, so all its steps survive."""
  limits, low = [], None
  for r in reversed(resumes):
    limits.append(low)
    if r is not None:
      low = r if low is None else min(low, r)
  return limits[::-1]


def _split_window(e: dict, limit: int | None) -> tuple[float, float, int]:
  """(productive s, replayed s, steps lost) of one train window, pro-rated by steps."""
  first, last = int(e["first_step"]), int(e["last_step"])
  compute = e["dur_s"] - e["data_wait_s"]
  lost = 0 if limit is None else max(0, last - max(first - 1, limit))
  frac = lost / max(last - first + 1, 1)
  return compute * (1 - frac), compute * frac, lost


def _window_start(evs: list[dict]) -> tuple[float, list[dict]]:
  """(time the first train window began, or the attempt's end; the events before it)."""
  for i, e in enumerate(evs):
    if e["event"] == "train":
      return e["time"] - e["dur_s"], evs[:i]
  return max(e["time"] for e in evs), evs


def _startup(evs: list[dict], t0: float) -> float:
  """Time before the first train window not covered by the events logged before it."""
  boundary, before = _window_start(evs)
  covered = sum(e["dur_s"] for e in before if e["event"] != "train" and _is_num(e.get("dur_s")))
  return boundary - t0 - covered


def _start_time(evs: list[dict]) -> float:
  starts = [e["time"] for e in evs if e["event"] == "start"]
  return starts[0] if starts else min(e["time"] for e in evs)


def _ending(evs: list[dict], is_last: bool) -> str:
  ends = [e for e in evs if e["event"] == "end"]
  if ends:
    return str(ends[-1].get("status", "unknown"))
  # A live run's last attempt has no end yet either, so only earlier ones were surely killed.
  return "no end" if is_last else "killed"


def _attempt(evs: list[dict], limit: int | None, is_last: bool) -> dict:
  """Per-attempt accounting: times, ending, steps and lost seconds by cause."""
  windows = [e for e in evs if e["event"] == "train"]
  splits = [_split_window(e, limit) for e in windows]
  t0 = _start_time(evs)
  lost = {"startup": _startup(evs, t0), "data_wait": sum(e["data_wait_s"] for e in windows),
          "replayed": sum(s[1] for s in splits)}
  for e in evs:
    if e["event"] != "train" and _is_num(e.get("dur_s")):
      lost[e["event"]] = lost.get(e["event"], 0.0) + e["dur_s"]
  steps = [(int(e["first_step"]), int(e["last_step"])) for e in windows]
  return {"attempt": evs[0]["attempt"], "start_time": t0, "end_time": max(e["time"] for e in evs),
          "ended": _ending(evs, is_last), "resumed_from": _resume_step(evs),
          "first_step": min((a for a, _ in steps), default=None),
          "last_step": max((b for _, b in steps), default=None),
          "steps": sum(b - a + 1 for a, b in steps), "steps_lost": sum(s[2] for s in splits),
          "productive_s": sum(s[0] for s in splits), "lost_s": lost}


def _clamp(x: float, tol: float, what: str, warnings: list[str]) -> float:
  """0 for a jitter-sized negative; a larger negative is kept and warned about."""
  if x <= -tol:
    warnings.append(f"{what} is {x:.3f} s: events overlap in time (a timing bug)")
  return 0.0 if -tol < x < 0 else x


def _downtime(attempts: list[dict], tol: float, warnings: list[str]) -> float:
  gaps = [b["start_time"] - a["end_time"] for a, b in itertools.pairwise(attempts)]
  return sum(_clamp(g, tol, f"gap before attempt {i + 2}", warnings) for i, g in enumerate(gaps))


def _total_lost(attempts: list[dict], tol: float, warnings: list[str]) -> dict[str, float]:
  lost = dict.fromkeys(CAUSES, 0.0)
  for i, a in enumerate(attempts):
    a["lost_s"]["startup"] = _clamp(a["lost_s"]["startup"], tol, f"startup of attempt {i + 1}",
                                    warnings)
    for cause, s in a["lost_s"].items():
      lost[cause] = lost.get(cause, 0.0) + s
  lost["down"] = _downtime(attempts, tol, warnings)
  return lost


def report(workdir: str) -> dict:
  """Goodput of the run in WORKDIR/goodput.jsonl. SystemExit (one line) if it has no events.

  Schema: {"file", "wall_s", "productive_s", "goodput" (productive / wall, 0..1),
  "lost_s": {cause: s} (CAUSES, any other timed event kinds, then "other"; with productive
  they sum to wall), "restarts", "steps_replayed", "malformed_lines", "warnings": [str],
  "attempts": [{"attempt", "start_time", "end_time" (unix s), "ended" (end status, or
  "killed" / "no end" for the last), "resumed_from" (step; 0 after init; None), "first_step",
  "last_step", "steps", "steps_lost", "productive_s", "lost_s"}]}.

  Steps of an attempt above the step a later attempt resumed from were re-run: their compute
  (dur_s - data_wait_s, pro-rated within a window) is "replayed"; all data waiting is
  "data_wait". "startup" is the part of each attempt before its first train window that no
  event accounts for; "down" the gaps between attempts; "other" the rest (loop overhead).
  """
  path = paths.join(workdir, FILENAME)
  found = paths.isfile(path)
  events, bad = read_events(path) if found else ([], 0)
  if not events:
    why = f"{bad} malformed lines" if bad else ("empty" if found else "missing")
    raise SystemExit(f"goodput: no events in {path} ({why})")
  groups = _group(events)
  limits = _keep_limits([_resume_step(g) for g in groups])
  attempts = [_attempt(g, lim, i == len(groups) - 1)
              for i, (g, lim) in enumerate(zip(groups, limits, strict=True))]
  return _summary(path, attempts, len(events), bad)


def _summary(path: str, attempts: list[dict], n_events: int, bad: int) -> dict:
  wall = attempts[-1]["end_time"] - attempts[0]["start_time"]
  tol = _SLEW * abs(wall) + _READ_JITTER_S * n_events
  warnings = [f"skipped {bad} malformed line(s)"] if bad else []
  productive = sum(a["productive_s"] for a in attempts)
  lost = _total_lost(attempts, tol, warnings)
  lost["other"] = _clamp(wall - productive - sum(lost.values()), tol, "other", warnings)
  return {"file": path, "wall_s": wall, "productive_s": productive,
          "goodput": productive / wall if wall > 0 else 0.0, "lost_s": lost,
          "restarts": len(attempts) - 1, "steps_replayed": sum(a["steps_lost"] for a in attempts),
          "malformed_lines": bad, "warnings": warnings, "attempts": attempts}


# ---------------------------------------------------------------------------- text


def _pct(s: float, wall: float) -> str:
  return f"{100 * s / wall:6.1f}%" if wall > 0 else "     -"


def _iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def _steps(a: dict) -> str:
  return f"{a['first_step']}-{a['last_step']} ({a['steps']})" if a["steps"] else "0"


def _resumed(a: dict) -> str:
  r = a["resumed_from"]
  return "-" if r is None else ("init" if r == 0 else f"step {r}")


def format_report(rep: dict) -> str:
  """The report as a table: goodput, lost time by cause, then one line per attempt."""
  wall = rep["wall_s"]
  lines = [f"goodput {100 * rep['goodput']:.1f}%  (productive {rep['productive_s']:,.1f} s "
           f"of {wall:,.1f} s wall)  {rep['file']}",
           f"restarts {rep['restarts']}, steps replayed {rep['steps_replayed']}, "
           f"malformed lines {rep['malformed_lines']}", "",
           f"{'':18}{'seconds':>14}  {'% wall':>7}",
           f"{'productive':18}{rep['productive_s']:14,.1f}  {_pct(rep['productive_s'], wall)}"]
  lines += [f"{c:18}{s:14,.1f}  {_pct(s, wall)}" for c, s in rep["lost_s"].items()]
  lines += ["", f"{'#':>3}  {'start (UTC)':25}  {'ended':9}  {'steps':>16}  resumed from"]
  lines += [f"{i:>3}  {_iso(a['start_time']):25}  {a['ended']:9}  {_steps(a):>16}  {_resumed(a)}"
            for i, a in enumerate(rep["attempts"], 1)]
  return "\n".join(lines + [f"warning: {w}" for w in rep["warnings"]])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mm_jax.goodput",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--json", action="store_true", help="print the report dict as JSON")
  args = parser.parse_args(argv)
  rep = report(args.workdir)
  print(json.dumps(rep, indent=2) if args.json else format_report(rep))


if __name__ == "__main__":
  sys.exit(main())
