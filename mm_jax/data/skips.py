"""Bad records: skipped and counted, or fatal under `data.strict`.

Example makers turn a bad record into a marker (a worker must not die on one record);
`SkipFilterIterDataset` runs after the worker pool, drops markers, counts them per reason
(the counts are part of the iterator state, so a resumed run keeps counting), logs one
warning line per record (rate-limited), and stops the run under `strict`. It also stops
the run once more than `data.max_skip_fraction` of (at least 100) records were bad.
"""

from __future__ import annotations

import dataclasses
import logging

import grain

SKIP = "_skip_reason"
_LOUD_WARNINGS = 20  # then one line per 1000 skips


class DataError(RuntimeError):
  """The data cannot feed the run (strict mode, or too many bad records)."""


def marker(reason: str, record_id: str, message: str) -> dict:
  return {SKIP: reason, "id": record_id, "message": message}


@dataclasses.dataclass
class SkipStats:
  seen: int = 0
  counts: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def skipped(self) -> int:
    return sum(self.counts.values())

  def metrics(self) -> dict[str, float]:
    out = {"data/skipped": self.skipped, "data/seen": self.seen}
    out.update({f"data/skipped/{k}": v for k, v in sorted(self.counts.items())})
    return out

  def check(self, max_fraction: float, min_seen: int = 100) -> None:
    """Raises DataError once more than `max_fraction` of (at least `min_seen`) records
    were bad: a data set that broken is a configuration error, not noise."""
    if self.seen >= min_seen and self.skipped > max_fraction * self.seen:
      raise DataError(f"{self.skipped} of {self.seen} records skipped "
                      f"({self.skipped / self.seen:.1%} > data.max_skip_fraction="
                      f"{max_fraction:.1%}); by reason: {self.counts}")


class SkipFilterIterDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, stats: SkipStats, *, strict: bool,
               max_fraction: float):
    super().__init__(parent)
    self._skip_stats, self._strict, self._max_fraction = stats, strict, max_fraction

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipFilterIterator(self._parent.__iter__(), self._skip_stats, self._strict,
                               self._max_fraction)


class _SkipFilterIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, stats: SkipStats, strict: bool,
               max_fraction: float):
    super().__init__(parent)
    self._skip_stats, self._strict, self._max_fraction = stats, strict, max_fraction

  def __next__(self):
    while True:
      item = next(self._parent)
      self._skip_stats.seen += 1
      if SKIP not in item:
        return item
      reason = item[SKIP]
      self._skip_stats.counts[reason] = self._skip_stats.counts.get(reason, 0) + 1
      if self._strict:
        raise DataError(f"data.strict: {item['message']}")
      # Checked here, not only in the loop: a data set where every record is bad would
      # otherwise spin forever without producing a batch. The message names the last one.
      try:
        self._skip_stats.check(self._max_fraction)
      except DataError as e:
        raise DataError(f"{e}; last: {item['message']}") from None
      n = self._skip_stats.skipped
      if n <= _LOUD_WARNINGS or n % 1000 == 0:
        logging.warning("skipped record %s (%s): %s [%d skipped so far]", item["id"], reason,
                        item["message"], n)

  def get_state(self):
    return {"parent": self._parent.get_state(), "seen": self._skip_stats.seen,
            "counts": dict(self._skip_stats.counts)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._skip_stats.seen = state["seen"]
    self._skip_stats.counts = dict(state["counts"])
