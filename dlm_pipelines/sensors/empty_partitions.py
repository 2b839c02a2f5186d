"""`empty_partition_sensor`: a day × system without imaging events is done, not missing.

Without this, the UI's partition view of raw_export shows every quiet day ×
system as "Missing" (1,004 of 1,008 on a fresh stack), and "backfill missing"
would launch a run for each. When a day has ended (plus a grace for late
events), every partition of it with no event in the catalog gets a runless
materialisation with `events: 0`; the cursor is the last day closed. An event
that still arrives for such a day is exported by the sensor's run as usual,
which materialises the partition again.
"""

from __future__ import annotations

from datetime import date

from dagster import (
    AssetKey,
    AssetMaterialization,
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from dlm_pipelines.catalog import Catalog, utcnow
from dlm_pipelines.partitions import days_to_close, partitions_with_events
from dlm_pipelines.settings import Settings

RAW_EXPORT = AssetKey("raw_export")
# A fresh stack catches up on a year of past days in a few ticks (a few hundred
# runless events each); after that a tick finds nothing and costs a date comparison.
DAYS_PER_TICK = 100
INTERVAL_SECONDS = 30


def build_empty_partition_sensor(settings: Settings) -> SensorDefinition:
    systems = list(settings.systems)
    first_day = settings.partition_start_date

    @sensor(
        name="empty_partition_sensor",
        description="Once a UTC day has ended, materialises its raw_export partitions that "
        "hold no imaging event with events: 0, so only partitions with work read as missing.",
        minimum_interval_seconds=INTERVAL_SECONDS,
        default_status=DefaultSensorStatus.RUNNING,
    )
    def empty_partition_sensor(context: SensorEvaluationContext, catalog: Catalog) -> SensorResult:
        last = date.fromisoformat(context.cursor) if context.cursor else None
        days = days_to_close(last, first_day, utcnow(), DAYS_PER_TICK)
        if not days:
            return SensorResult(skip_reason="no day has ended since the last one closed")
        keys = [f"{day.isoformat()}|{system}" for day in days for system in systems]
        busy = partitions_with_events(catalog.engine, keys)
        empty = [key for key in keys if key not in busy]
        context.log.info(
            f"closed {days[0]}..{days[-1]}: {len(empty)} empty partition(s), "
            f"{len(busy)} with events"
        )
        return SensorResult(
            asset_events=[
                AssetMaterialization(
                    asset_key=RAW_EXPORT,
                    partition=key,
                    description="no imaging events on this day",
                    metadata={"events": 0},
                )
                for key in empty
            ],
            cursor=days[-1].isoformat(),
        )

    return empty_partition_sensor
