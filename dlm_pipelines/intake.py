"""Intake of imaging events that cannot be poisoned (issue 11).

Every stream entry ends as exactly one of: a catalogued event, a silent repeat of
one (same ref_id, same content), or a dead letter with its original fields, its
source id and the reason. An exception while handling one entry dead-letters that
entry alone; only an outage (Redis or the catalog unreachable) escapes, and then
the caller's cursor does not move, so nothing is lost and the next tick resumes.

Free of Dagster: `sensors/imaging_events.py` wires it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import redis
import sqlalchemy as sa

from dlm_pipelines.catalog import Catalog, EventRecord
from dlm_pipelines.events import (
    ImagingEvent,
    InvalidEvent,
    TimeWindow,
    parse_imaging_event,
    same_content,
)
from dlm_pipelines.exporter import event_from_record
from dlm_pipelines.partitions import partition_key_for
from dlm_pipelines.resources.redis_streams import RedisStreams, StreamEntry
from dlm_pipelines.stream_retention import stream_id_key

CONFLICT = "conflicts with the recorded event"


@dataclass
class IntakeReport:
    accepted: list[tuple[ImagingEvent, str, str]] = field(default_factory=list)
    new: set[str] = field(default_factory=set)  # ref_ids catalogued by this intake
    repeated: list[str] = field(default_factory=list)  # identical repeats (no-ops)
    dead_lettered: int = 0
    conflicts: int = 0  # of dead_lettered: a known ref_id with other content
    reasons: list[tuple[str, str]] = field(default_factory=list)  # (stream id, reason)


def _is_outage(exc: BaseException) -> bool:
    return isinstance(
        exc,
        redis.ConnectionError
        | redis.TimeoutError
        | sa.exc.OperationalError
        | sa.exc.InterfaceError
        | sa.exc.DisconnectionError
        | sa.exc.TimeoutError,
    )


def _difference(a: ImagingEvent, b: ImagingEvent) -> str | None:
    """None when two events with one ref_id say the same; else the fields that differ."""
    if same_content(a, b):
        return None
    names = [
        name
        for name in ("experiment_id", "timestamp", "type", "system", "local_path", "img_count")
        if getattr(a, name) != getattr(b, name)
    ]
    if a.metadata != b.metadata:
        names.append("metadata")
    return ", ".join(names) or "content"


def _difference_from(event: ImagingEvent, record: EventRecord) -> str | None:
    try:
        recorded = event_from_record(record)
    except Exception as exc:  # a row that no longer parses differs by definition
        return f"the recorded row ({exc})"
    return _difference(event, recorded)


@dataclass
class Intake:
    catalog: Catalog
    streams: RedisStreams
    systems: Collection[str]

    def take(self, entries: list[StreamEntry], window: TimeWindow) -> IntakeReport:
        report = IntakeReport()
        fields_of = dict(entries)
        first: dict[str, tuple[ImagingEvent, str, str]] = {}
        for stream_id, fields in entries:
            try:
                event = parse_imaging_event(fields, self.systems, window)
                earlier = first.get(event.ref_id)
                if earlier is None:
                    first[event.ref_id] = (event, stream_id, partition_key_for(event))
                    continue
                difference = _difference(earlier[0], event)
                if difference is None:
                    report.repeated.append(event.ref_id)
                    continue
                report.conflicts += 1
                raise InvalidEvent(
                    f"{CONFLICT} (entry {earlier[1]} of this batch; differs in {difference})"
                )
            except Exception as exc:
                if _is_outage(exc):
                    raise
                self._reject(report, stream_id, fields, exc)

        accepted = self._record(report, list(first.values()), fields_of)
        # A ref_id the catalog already holds: identical → no-op, different → conflict.
        known = [item for item in accepted if item[0].ref_id not in report.new]
        records = {r.ref_id: r for r in self.catalog.get_many([e.ref_id for e, _, _ in known])}
        for event, stream_id, partition_key in known:
            record = records[event.ref_id]
            difference = _difference_from(event, record)
            if difference is None:
                report.repeated.append(event.ref_id)
                report.accepted.append((event, stream_id, partition_key))
            else:
                report.conflicts += 1
                self._reject(
                    report,
                    stream_id,
                    fields_of[stream_id],
                    InvalidEvent(
                        f"{CONFLICT} (received {record.received_at.isoformat()} from entry "
                        f"{record.stream_id}; differs in {difference})"
                    ),
                )
        report.accepted.extend(item for item in accepted if item[0].ref_id in report.new)
        report.accepted.sort(key=lambda item: stream_id_key(item[1]))
        return report

    def _record(
        self,
        report: IntakeReport,
        items: list[tuple[ImagingEvent, str, str]],
        fields_of: dict[str, list[tuple[bytes, bytes]]],
    ) -> list[tuple[ImagingEvent, str, str]]:
        """Catalogue the batch in one statement; if the database refuses it (not an
        outage), one by one, and dead-letter each row it refuses."""
        try:
            report.new = self.catalog.record_events(items)
            return items
        except Exception:  # the driver refuses some values before PostgreSQL does
            # An outage raises here, and the tick fails as it should; else some row
            # is what the database refuses.
            self.catalog.ping()
        kept = []
        for item in items:
            try:
                report.new |= self.catalog.record_events([item])
                kept.append(item)
            except Exception as exc:
                self.catalog.ping()
                self._reject(report, item[1], fields_of[item[1]], exc)
        return kept

    def _reject(
        self,
        report: IntakeReport,
        stream_id: str,
        fields: list[tuple[bytes, bytes]],
        exc: BaseException,
    ) -> None:
        reason = (
            str(exc)
            if isinstance(exc, InvalidEvent)
            else f"could not be handled: {type(exc).__name__}: {str(exc)[:2000]}"
        )
        self.streams.dead_letter(stream_id, fields, reason)
        report.dead_lettered += 1
        report.reasons.append((stream_id, reason))
