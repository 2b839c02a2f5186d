"""Export partitions: UTC day × system (see docs/design.md for why not one per event)."""

from __future__ import annotations

from functools import lru_cache

from dagster import (
    DailyPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    StaticPartitionsDefinition,
)

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
