"""The warm run's loop (`export_partition` with a `Linger`): pure timing logic, with a
catalog and an exporter that only record what they are asked."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from dlm_pipelines.exporter import ExportOutcome, Linger, export_partition


@dataclass
class Catalog:
    """Never-tried events of one partition, as the sensor records them."""

    waiting: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ref_id: str) -> None:
        with self.lock:
            self.waiting[ref_id] = SimpleNamespace(ref_id=ref_id, timestamp=datetime.now(UTC))

    def ref_ids_in_partition(self, partition_key: str, status: str) -> list[str]:
        with self.lock:
            return list(self.waiting)

    def get_many(self, ref_ids: list[str]) -> list[Any]:
        with self.lock:
            return [self.waiting[ref_id] for ref_id in ref_ids]


@dataclass
class Exporter:
    catalog: Catalog
    progress: None = None

    def export(self, record: Any, *, force: bool) -> ExportOutcome:
        with self.catalog.lock:
            self.catalog.waiting.pop(record.ref_id, None)  # claimed, then verified
        return ExportOutcome(record.ref_id, exported=True)


def run(catalog: Catalog, linger: Linger) -> list[str]:
    outcomes = export_partition(
        Exporter(catalog),  # type: ignore[arg-type]
        "2026-01-01|prince",
        [],
        force=False,
        concurrency=2,
        heartbeat_seconds=60,
        on_heartbeat=lambda accepting: None,
        linger=linger,
    )
    return [o.ref_id for o in outcomes]


def test_a_warm_run_takes_events_until_idle_then_for_the_grace_after_its_stop() -> None:
    catalog = Catalog()
    stopped = threading.Event()

    def arrive() -> None:
        catalog.record("while-warm")
        stopped.wait(5)
        time.sleep(0.3)  # recorded on a sensor's answer from before the stop
        catalog.record("within-grace")
        time.sleep(1.2)
        catalog.record("after-grace")  # the sensor requests a run for this one

    threading.Timer(0.1, arrive).start()
    exported = run(
        catalog,
        Linger(
            idle_seconds=0.4,
            max_seconds=30,
            stop_accepting=stopped.set,
            others_waiting=lambda: False,
            grace_seconds=0.8,
            poll_seconds=0.05,
        ),
    )
    assert stopped.is_set()
    assert exported == ["while-warm", "within-grace"]


def test_a_warm_run_stops_taking_events_when_another_run_of_its_system_waits() -> None:
    catalog = Catalog()
    catalog.record("first")
    stops: list[float] = []
    started = time.monotonic()
    exported = run(
        catalog,
        Linger(
            idle_seconds=30,
            max_seconds=30,
            stop_accepting=lambda: stops.append(time.monotonic() - started),
            others_waiting=lambda: True,
            grace_seconds=0.2,
            poll_seconds=0.05,
        ),
    )
    assert exported == ["first"] and len(stops) == 1 and stops[0] < 1
