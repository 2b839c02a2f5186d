"""Automatic recovery and bounded streams (issue 11, items 3 and 4): failed events are
retried by the sweep with backoff and given up on with a reason; lost announcements
are made; old stream entries are trimmed, never one the sensor has not read."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dlm_pipelines.catalog import EVENTS, EventStatus
from dlm_pipelines.definitions import build_definitions
from tests.integration.helpers import (
    make_event,
    make_settings,
    materialize_requests,
    run_sensor,
)

pytestmark = pytest.mark.integration
TODAY = datetime.now(UTC).date().isoformat()


@pytest.fixture
def root(data_root) -> Path:
    return Path(data_root.path)


def recovering_dlm(catalog, object_store, streams, data_root, **overrides):
    values = {
        "export_max_retries": 0,  # one attempt per run: the sweep does the retrying
        "export_retry_backoff_seconds": 1,
        "export_retry_backoff_max_seconds": 2,
        **overrides,
    }
    return build_definitions(make_settings(catalog, object_store, streams, data_root, **values))


def announced(streams) -> list[str]:
    return [f["ref_id"] for _, f in streams.client.xrange(streams.export_stream)]


def test_a_failed_event_is_retried_after_its_backoff_and_completes(
    catalog, object_store, streams, data_root, dagster_instance, root
) -> None:
    dlm = recovering_dlm(catalog, object_store, streams, data_root)
    fields = make_event(root, write=False)  # its folder is not there yet (a slow share)
    streams.client.xadd(streams.imaging_event_stream, fields)
    tick = run_sensor(dlm, dagster_instance)
    (outcome,) = materialize_requests(dlm, dagster_instance, tick)
    assert not outcome.success
    assert catalog.get(fields["ref_id"]).status == EventStatus.FAILED

    # the first sweep only schedules the retry: not before the backoff
    tick = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    assert tick.run_requests == []
    record = catalog.get(fields["ref_id"])
    assert record.next_attempt_at is not None and record.export_runs == 1
    make_event(root, local_path=fields["local_path"])  # the folder arrives
    time.sleep(1.2)
    tick = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    (request,) = tick.run_requests
    assert request.tags["dlm/trigger"] == "sweep"
    assert request.run_config["ops"]["raw_export"]["config"]["ref_ids"] == [fields["ref_id"]]
    assert all(o.success for o in materialize_requests(dlm, dagster_instance, tick))
    record = catalog.get(fields["ref_id"])
    assert record.status == EventStatus.VERIFIED and record.export_runs == 2
    assert announced(streams) == [fields["ref_id"]]


def test_after_max_attempts_an_event_needs_attention_with_its_last_reason(
    catalog, object_store, streams, data_root, dagster_instance, root
) -> None:
    dlm = recovering_dlm(
        catalog,
        object_store,
        streams,
        data_root,
        export_max_attempts=3,
        export_retry_backoff_seconds=0.05,
        export_retry_backoff_max_seconds=0.1,
    )
    fields = make_event(root, write=False)  # never appears
    streams.client.xadd(streams.imaging_event_stream, fields)
    tick = run_sensor(dlm, dagster_instance)
    runs = 0
    for _ in range(20):
        runs += len(materialize_requests(dlm, dagster_instance, tick))
        if catalog.get(fields["ref_id"]).status == EventStatus.NEEDS_ATTENTION:
            break
        time.sleep(0.15)
        tick = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    record = catalog.get(fields["ref_id"])
    assert record.status == EventStatus.NEEDS_ATTENTION and runs == 3
    assert record.last_error.startswith("gave up after 3 export runs: ")
    assert "does not exist" in record.last_error
    time.sleep(0.15)
    assert run_sensor(dlm, dagster_instance, cursor=tick.cursor).run_requests == []
    assert announced(streams) == []


def test_a_lost_announcement_is_made_by_the_sweep_once(
    catalog, object_store, streams, data_root, dagster_instance, root
) -> None:
    dlm = recovering_dlm(catalog, object_store, streams, data_root)
    fields = make_event(root)
    streams.client.xadd(streams.imaging_event_stream, fields)
    tick = run_sensor(dlm, dagster_instance)
    assert all(o.success for o in materialize_requests(dlm, dagster_instance, tick))
    # the worker died between `verified` and the XADD: no entry, no announced_at
    streams.client.delete(streams.export_stream)
    with catalog.engine.begin() as conn:
        conn.execute(sa.update(EVENTS).values(announced_at=None))
    tick = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    assert tick.run_requests == []
    assert announced(streams) == [fields["ref_id"]]
    assert catalog.get(fields["ref_id"]).announced_at is not None
    run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    assert announced(streams) == [fields["ref_id"]]


def test_streams_are_trimmed_and_unread_entries_kept(
    catalog, object_store, streams, data_root, dagster_instance, root
) -> None:
    dlm = recovering_dlm(catalog, object_store, streams, data_root)  # 7 days' retention
    imaging = streams.imaging_event_stream
    # ids in 1970: far older than the retention
    for stream_id in ("1000-0", "2000-0", "3000-0"):
        streams.client.xadd(imaging, make_event(root), id=stream_id)
    for stream in (streams.export_stream, streams.dead_letter_stream):
        streams.client.xadd(stream, {"old": "1"}, id="1000-0")
        streams.client.xadd(stream, {"new": "1"})
    # the sensor has read up to 2000-0 only: 3000-0 must survive until it is read
    tick = run_sensor(dlm, dagster_instance, cursor="2000-0")
    assert [i for i, _ in streams.client.xrange(imaging)] == ["2000-0", "3000-0"]
    assert tick.cursor == "3000-0" and not tick.asset_events  # no "lost entries" alarm
    assert [r.partition_key for r in tick.run_requests] == [f"{TODAY}|prince"]  # 3000-0 read
    for stream in (streams.export_stream, streams.dead_letter_stream):
        assert [f for _, f in streams.client.xrange(stream)] == [{"new": "1"}]
    run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    assert [i for i, _ in streams.client.xrange(imaging)] == ["3000-0"]


def test_a_future_dated_event_is_exported_when_its_day_begins(
    catalog, object_store, streams, data_root, dagster_instance, root
) -> None:
    from dagster._core.test_utils import freeze_time  # Dagster's clock, for its partitions

    dlm = recovering_dlm(catalog, object_store, streams, data_root, sensor_sweep_after_seconds=1)
    later = datetime.now(UTC) + timedelta(days=3)
    fields = make_event(root, timestamp=later)
    streams.client.xadd(streams.imaging_event_stream, fields)
    tick = run_sensor(dlm, dagster_instance)
    assert tick.run_requests == []  # its day has not begun: no partition yet
    assert "in the future" in catalog.get(fields["ref_id"]).last_error
    time.sleep(1.2)
    assert run_sensor(dlm, dagster_instance, cursor=tick.cursor).run_requests == []

    with freeze_time(later):  # three days on
        sweep = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
        assert [r.partition_key for r in sweep.run_requests] == [
            f"{later.date().isoformat()}|prince"
        ]
        assert all(o.success for o in materialize_requests(dlm, dagster_instance, sweep))
    record = catalog.get(fields["ref_id"])
    assert record.status == EventStatus.VERIFIED and record.last_error is None
    assert announced(streams) == [fields["ref_id"]]


def test_a_due_retry_rides_along_with_new_events_of_its_partition(
    catalog, object_store, streams, data_root, dagster_instance, root
) -> None:
    dlm = recovering_dlm(catalog, object_store, streams, data_root)
    failing = make_event(root, write=False)
    streams.client.xadd(streams.imaging_event_stream, failing)
    tick = run_sensor(dlm, dagster_instance)
    materialize_requests(dlm, dagster_instance, tick)
    tick = run_sensor(dlm, dagster_instance, cursor=tick.cursor)  # schedules the retry
    make_event(root, local_path=failing["local_path"])
    time.sleep(1.2)
    # a busy microscope: new events in the same partition every tick
    fresh = make_event(root)
    streams.client.xadd(streams.imaging_event_stream, fresh)
    tick = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    (request,) = tick.run_requests
    assert request.run_config["ops"]["raw_export"]["config"]["ref_ids"] == [
        fresh["ref_id"],
        failing["ref_id"],
    ]
    assert all(o.success for o in materialize_requests(dlm, dagster_instance, tick))
    assert {r.status for r in catalog.get_many([fresh["ref_id"], failing["ref_id"]])} == {
        EventStatus.VERIFIED
    }
