"""Export partitions: UTC day × system (see docs/design.md for why not one per event)."""

from __future__ import annotations

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
    return str(MultiPartitionKey({DATE: event.partition_date, SYSTEM: event.system}))


def system_of(partition_key: str) -> str:
    return partition_key.split("|", 1)[1]
