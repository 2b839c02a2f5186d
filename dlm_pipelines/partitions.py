"""Export partitions: UTC day × system (see docs/design.md for why not one per event)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, timedelta
from functools import lru_cache

import sqlalchemy as sa
from dagster import (
    DailyPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    StaticPartitionsDefinition,
)

from dlm_pipelines.catalog import EVENTS
from dlm_pipelines.events import ImagingEvent
from dlm_pipelines.settings import Settings

DATE = "date"
SYSTEM = "system"


def export_partitions(settings: Settings) -> MultiPartitionsDefinition:
    return MultiPartitionsDefinition(
        {
            DATE: DailyPartitionsDefinition(
                start_date=settings.partition_start_date.isoformat(), end_offset=1
            ),
            SYSTEM: StaticPartitionsDefinition(list(settings.systems)),
        }
    )


def partition_key_for(event: ImagingEvent) -> str:
    """`YYYY-MM-DD|system`, the string form of the multi-partition key."""
    return _partition_key(event.partition_date, event.system)


@lru_cache(maxsize=4096)  # a MultiPartitionKey costs ~40 µs; a batch has a few keys
def _partition_key(date: str, system: str) -> str:
    return str(MultiPartitionKey({DATE: date, SYSTEM: system}))


def system_of(partition_key: str) -> str:
    return partition_key.split("|", 1)[1]


# A day is closed this long after it ended (UTC): late events of a day still arrive.
CLOSE_AFTER = timedelta(hours=1)


def days_to_close(
    last_closed: date | None, first_day: date, now: datetime, limit: int
) -> list[date]:
    """The days after `last_closed` (from `first_day`) that ended CLOSE_AFTER ago, oldest
    first, at most `limit` of them."""
    closable = (now - CLOSE_AFTER).date() - timedelta(days=1)
    day = max(first_day, last_closed + timedelta(days=1) if last_closed else first_day)
    days: list[date] = []
    while day <= closable and len(days) < limit:
        days.append(day)
        day += timedelta(days=1)
    return days


def partitions_with_events(engine: sa.Engine, keys: Iterable[str]) -> set[str]:
    """Which of these partition keys hold at least one catalogued event."""
    keys = list(keys)
    column = EVENTS.c.partition_key
    with engine.connect() as connection:
        found = connection.scalars(sa.select(column).where(column.in_(keys)).distinct())
        return set(found)
