"""Automatic recovery: work that would otherwise wait for an operator (issue 11).

The imaging sensor's sweep calls `Recovery.sweep` every tick:

- failed events are retried with exponential backoff (DLM_EXPORT_RETRY_BACKOFF_SECONDS,
  doubling, capped at DLM_EXPORT_RETRY_BACKOFF_MAX_SECONDS) until
  DLM_EXPORT_MAX_ATTEMPTS export runs have tried them, then become needs_attention
  with the last reason;
- verified events whose announcement was lost (the worker died between `verified`
  and the XADD) are announced, unless the run that verified them is still alive.

Free of Dagster: the caller turns `due` into run requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from dlm_pipelines.catalog import Catalog
from dlm_pipelines.exporter import announce
from dlm_pipelines.resources import RedisStreams


@dataclass(frozen=True)
class RetrySchedule:
    backoff_seconds: float
    max_backoff_seconds: float
    max_runs: int

    def delay(self, runs: int) -> float:
        """Seconds before the retry after `runs` export runs failed."""
        exponent = min(max(runs - 1, 0), 60)  # 2**60 s is far past any cap
        return float(min(self.backoff_seconds * 2**exponent, self.max_backoff_seconds))


@dataclass
class SweepReport:
    due: dict[str, list[str]] = field(default_factory=dict)  # partition → ref_ids
    gave_up: list[tuple[str, str]] = field(default_factory=list)  # (ref_id, reason)
    announced: list[str] = field(default_factory=list)


@dataclass
class Recovery:
    catalog: Catalog
    streams: RedisStreams
    retries: RetrySchedule
    run_is_alive: Callable[[str], bool]

    def sweep(self, now: datetime) -> SweepReport:
        report = SweepReport(gave_up=self.catalog.give_up(self.retries.max_runs))
        for ref_id, partition_key in self.catalog.take_due_retries(now, self.retries.delay):
            report.due.setdefault(partition_key, []).append(ref_id)
        for record in self.catalog.unannounced():
            if record.run_id is not None and self.run_is_alive(record.run_id):
                continue  # its run announces it in a moment
            announce(self.catalog, self.streams, record)
            report.announced.append(record.ref_id)
        return report
