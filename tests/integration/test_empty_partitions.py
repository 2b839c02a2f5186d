"""Quiet days do not read as missing work: once a day has ended, its partitions without
events are materialised with `events: 0`, so "backfill missing" launches only runs
that have something to export."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from dagster import AssetKey, build_sensor_context

from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.partitions import days_to_close
from tests.integration.helpers import make_settings
from tests.integration.test_api import insert_event

pytestmark = pytest.mark.integration
RAW_EXPORT = AssetKey("raw_export")


def tick(defs, instance, cursor):
    sensor = defs.resolve_sensor_def("empty_partition_sensor")
    with build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources) as ctx:
        result = sensor(ctx)
    return result


def test_only_partitions_with_work_stay_missing(
    catalog, object_store, streams, data_root, dagster_instance
) -> None:
    today = datetime.now(UTC).date()
    start = today - timedelta(days=4)
    settings = make_settings(
        catalog, object_store, streams, data_root,
        partition_start_date=start.isoformat(), systems=["prince", "tsu-exp002"],
    )  # fmt: skip
    defs = build_definitions(settings)
    busy_day = today - timedelta(days=2)
    stamp = datetime(busy_day.year, busy_day.month, busy_day.day, 12, tzinfo=UTC)
    unexported = insert_event(
        catalog, verified=False, timestamp=stamp, partition_key=f"{busy_day}|prince"
    )

    result = tick(defs, dagster_instance, None)
    closed = days_to_close(None, start, datetime.now(UTC), 100)
    assert closed[0] == start and closed[-1] in (today - timedelta(days=1), today - timedelta(2))
    keys = {m.partition for m in result.asset_events}
    expected = {f"{d}|{s}" for d in closed for s in ("prince", "tsu-exp002")}
    assert keys == expected - {unexported["partition_key"]}
    assert all(m.metadata["events"].value == 0 for m in result.asset_events)
    assert result.cursor == closed[-1].isoformat()
    assert not tick(defs, dagster_instance, result.cursor).asset_events  # each day closes once

    for materialization in result.asset_events:  # what the daemon does with a sensor's events
        dagster_instance.report_runless_asset_event(materialization)
    partitions_def = defs.resolve_assets_def("raw_export").partitions_def
    done = dagster_instance.get_materialized_partitions(RAW_EXPORT)
    missing = set(partitions_def.get_partition_keys()) - done
    open_days = {
        f"{d}|{s}" for d in (today, today - timedelta(days=1)) for s in ("prince", "tsu-exp002")
    }
    # a backfill of the missing partitions: the day with an unexported event, and only the
    # days not yet over (and today's with the partitions' end_offset)
    assert unexported["partition_key"] in missing
    assert missing - open_days == {unexported["partition_key"]}


def test_a_day_closes_an_hour_after_it_ends() -> None:
    start = datetime(2026, 12, 1).date()
    assert days_to_close(None, start, datetime(2026, 12, 2, 0, 59, tzinfo=UTC), 10) == []
    assert days_to_close(None, start, datetime(2026, 12, 2, 1, 0, tzinfo=UTC), 10) == [start]
    assert days_to_close(start, start, datetime(2026, 12, 5, 3, tzinfo=UTC), 2) == [
        start + timedelta(days=1),
        start + timedelta(days=2),
    ]
