"""Which local copies the purge may delete, and why the others stay (pure logic).

The one rule: no local data is deleted unless a verified copy of exactly those bytes
is in S3. This module decides from catalog rows, the clock and a disk reading only;
the purge engine (`purger.py`) then proves each decision with a fresh HEAD of the
object, while it holds the event in the catalog, before it deletes anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from dlm_pipelines.catalog import EventRecord, EventStatus
from dlm_pipelines.settings import Settings


@dataclass(frozen=True)
class PurgePolicy:
    systems: frozenset[str]  # opted in; no other system's data is ever deleted
    lifespan: timedelta  # counted from received_at
    min_free_percent: float  # of the data root's filesystem; 0 turns disk pressure off

    @classmethod
    def from_settings(cls, settings: Settings) -> PurgePolicy:
        return cls(
            systems=frozenset(settings.purge_systems),
            lifespan=settings.purge_lifespan,
            min_free_percent=settings.purge_min_free,
        )


@dataclass(frozen=True)
class DiskLevel:
    total: int  # bytes
    free: int  # bytes available to the microscopes

    @property
    def free_percent(self) -> float:
        return 100 * self.free / self.total if self.total else 100.0

    def bytes_short(self, min_free_percent: float) -> int:
        """Bytes to free before `min_free_percent` of the filesystem is free again."""
        return max(0, math.ceil(self.total * min_free_percent / 100) - self.free)


class Why(StrEnum):
    """Why an event's local copy is deleted."""

    LIFESPAN = "lifespan passed"
    DISK_PRESSURE = "disk pressure"
    TRASH = "left in the trash by an earlier run"  # moved after its proof, not recorded


# Skip reasons decided here; purger.py adds those that need the disk or S3.
NOT_OPTED_IN = "system not in DLM_PURGE_SYSTEMS"
ALREADY_PURGED = "already purged"
NEEDS_ATTENTION = "needs attention"
NOT_VERIFIED = "not verified"
NO_OBJECT = "no verified object recorded"
TOO_YOUNG = "lifespan not passed"


@dataclass(frozen=True)
class Skip:
    reason: str  # one of a few fixed phrases, so that runs can count them
    detail: str = ""


@dataclass(frozen=True)
class PurgePlan:
    due: list[EventRecord]  # lifespan passed: every one is purged, oldest first
    early: list[EventRecord]  # verified, still young: purged oldest first under pressure
    skipped: list[tuple[EventRecord, Skip]]  # and why not
    bytes_short: int  # what disk pressure asks to free (0: none)


def oldest_first(record: EventRecord) -> tuple[datetime, datetime, str]:
    return record.received_at, record.timestamp, record.ref_id


def due_at(record: EventRecord, policy: PurgePolicy) -> datetime:
    return record.received_at + policy.lifespan


def never_now(record: EventRecord, policy: PurgePolicy) -> Skip | None:
    """Why `record` may not be purged now whatever its age or the disk; None if it may."""
    if record.purged_at is not None:
        return Skip(ALREADY_PURGED, record.purged_at.isoformat())
    if record.system not in policy.systems:
        return Skip(NOT_OPTED_IN, record.system)
    if record.status == EventStatus.NEEDS_ATTENTION:
        return Skip(NEEDS_ATTENTION, record.last_error or "")
    # `purging`: a purge run holds it; the job takes it over only if that run died.
    if record.status not in (EventStatus.VERIFIED, EventStatus.PURGING):
        return Skip(NOT_VERIFIED, f"status {record.status}")
    if not (record.bucket and record.object_key and record.size is not None and record.sha256):
        return Skip(NO_OBJECT)
    return None


def too_young(record: EventRecord, policy: PurgePolicy) -> Skip:
    return Skip(TOO_YOUNG, f"due {due_at(record, policy).isoformat()}")


def plan_purge(
    records: Iterable[EventRecord], policy: PurgePolicy, now: datetime, disk: DiskLevel
) -> PurgePlan:
    due: list[EventRecord] = []
    early: list[EventRecord] = []
    skipped: list[tuple[EventRecord, Skip]] = []
    for record in sorted(records, key=oldest_first):
        skip = never_now(record, policy)
        if skip is not None:
            skipped.append((record, skip))
        elif due_at(record, policy) <= now:
            due.append(record)
        else:
            early.append(record)
    return PurgePlan(due, early, skipped, disk.bytes_short(policy.min_free_percent))


def take_for_pressure(early: Sequence[EventRecord], bytes_short: int) -> list[EventRecord]:
    """The oldest events whose exported sizes just cover `bytes_short`.

    A tar is larger than the files in it, so this never takes more than needed; the
    job asks again with whatever is still short after deleting these.
    """
    taken: list[EventRecord] = []
    covered = 0
    for record in early:
        if covered >= bytes_short:
            break
        taken.append(record)
        covered += record.size or 0
    return taken
