"""Export end to end: legacy events on Redis → sensor → runs → verified tars in S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from dagster import AssetObservation, DagsterRunStatus

from dlm_pipelines.catalog import EVENTS, Catalog, EventRecord, EventStatus
from dlm_pipelines.dagster_runs import ACCEPTING_TAG
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.resources import ObjectStore
from tests.integration.helpers import (
    make_event,
    make_settings,
    materialize_partition,
    materialize_requests,
    run_sensor,
    sha256,
    tree,
    untar,
)

pytestmark = pytest.mark.integration
TODAY = datetime.now(UTC).date().isoformat()


@pytest.fixture
def settings(catalog, object_store, streams, data_root):
    return make_settings(catalog, object_store, streams, data_root)


@pytest.fixture
def dlm(settings):
    return build_definitions(settings)


@pytest.fixture
def root(data_root) -> Path:
    return Path(data_root.path)


def publish(streams, *events: dict[str, str]) -> list[str]:
    return [streams.client.xadd(streams.imaging_event_stream, fields) for fields in events]


def announcements(streams) -> list[dict[str, str]]:
    return [fields for _, fields in streams.client.xrange(streams.export_stream)]


def object_bytes(store: ObjectStore, key: str) -> bytes:
    return store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()


def test_legacy_events_become_verified_tars(
    dlm, dagster_instance, streams, object_store, catalog: Catalog, root
) -> None:
    events = [
        make_event(root, files={"Img_r01_c01.tif": b"a" * 7000, "sub/Img_r01_c02.tif": b"b" * 10}),
        make_event(root, system="tsu-exp002", experiment_id="exp-b"),
        make_event(root, experiment_id="exp-c"),
    ]
    publish(streams, *events)

    result = run_sensor(dlm, dagster_instance)
    assert {r.partition_key for r in result.run_requests} == {
        f"{TODAY}|prince",
        f"{TODAY}|tsu-exp002",
    }
    assert all(r.tags["dlm/system"] == r.partition_key.split("|")[1] for r in result.run_requests)
    assert all(o.success for o in materialize_requests(dlm, dagster_instance, result))

    announced = {fields["ref_id"]: fields for fields in announcements(streams)}
    assert set(announced) == {e["ref_id"] for e in events}
    for fields in events:
        record = catalog.get(fields["ref_id"])
        assert record is not None and record.status == EventStatus.VERIFIED
        assert record.verified_at is not None and record.run_id is not None
        body = object_bytes(object_store, record.object_key)
        # the bytes untar to exactly the source files plus metadata.json, which is last
        members = untar(body)
        files = {name: data for name, data in members.items() if data is not None}
        metadata = json.loads(files.pop("./metadata.json"))
        assert files == tree(root / fields["system"] / fields["local_path"])
        assert list(members)[-1] == "./metadata.json"
        assert metadata["ref_id"] == fields["ref_id"] and metadata["schema_version"] == "1a1"
        assert metadata["metadata"] == json.loads(fields["metadata"])
        assert "local_path" not in metadata and "img_count" not in metadata
        # dlm:new-export tells the truth about the object
        entry = announced[fields["ref_id"]]
        assert json.loads(entry["checksum"]) == {"hex": sha256(body), "algorithm": "sha256"}
        assert int(entry["size"]) == len(body) == record.size
        assert entry["key"] == f"{object_store.bucket}/{record.object_key}"
        assert record.sha256 == sha256(body)
        assert datetime.fromisoformat(entry["timestamp"]).tzinfo is not None
        head = object_store.head(record.object_key)
        assert head is not None and head["Metadata"] == {
            "sha256": sha256(body),
            "ref-id": fields["ref_id"],
        }

    # The materialisation carries the per-event table.
    materialization = dagster_instance.get_latest_materialization_event(
        dlm.resolve_assets_def("raw_export").key
    )
    assert materialization is not None
    metadata = materialization.asset_materialization.metadata
    assert {"events", "bytes", "seconds", "MB/s", "exports"} <= set(metadata)


def test_single_file_source(dlm, dagster_instance, streams, object_store, catalog, root) -> None:
    (root / "prince" / "Video").mkdir(parents=True)
    (root / "prince" / "Video" / "clip.avi").write_bytes(b"v" * 4321)
    fields = make_event(root, local_path="Video/clip.avi", event_type="video", write=False)
    publish(streams, fields)
    assert all(
        o.success
        for o in materialize_requests(dlm, dagster_instance, run_sensor(dlm, dagster_instance))
    )
    record = catalog.get(fields["ref_id"])
    assert record.object_key.startswith("videos/exp-a/")
    members = untar(object_bytes(object_store, record.object_key))
    assert list(members) == ["clip.avi", "./metadata.json"]
    assert members["clip.avi"] == b"v" * 4321


def test_duplicates_are_exported_once(
    dlm, dagster_instance, streams, object_store, catalog, root
) -> None:
    fields = make_event(root)
    publish(streams, fields, fields)
    first = run_sensor(dlm, dagster_instance)
    assert len(first.run_requests) == 1
    assert first.run_requests[0].run_config["ops"]["raw_export"]["config"]["ref_ids"] == [
        fields["ref_id"]
    ]
    materialize_requests(dlm, dagster_instance, first)
    # the same event again, later: no new run, no second upload or announcement
    publish(streams, fields)
    again = run_sensor(dlm, dagster_instance, cursor=first.cursor)
    assert again.run_requests == []
    assert "repeated" in (again.skip_reason.skip_message if again.skip_reason else "")
    # and a forced-free re-run of the partition is a no-op for a verified event
    assert materialize_partition(dlm, dagster_instance, f"{TODAY}|prince").success
    assert [a["ref_id"] for a in announcements(streams)] == [fields["ref_id"]]
    with catalog.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(EventRecord)) == 1
    assert catalog.get(fields["ref_id"]).attempts == 1


def test_invalid_entries_are_dead_lettered_and_the_rest_goes_on(
    dlm, dagster_instance, streams, catalog, root
) -> None:
    good = make_event(root)
    naive = {**make_event(root), "timestamp": "2026-12-01T07:07:47"}
    escape = {**make_event(root), "local_path": "../tsu-exp002/secret"}
    bad_metadata = {**make_event(root), "metadata": "{'application': 1}"}
    ids = publish(streams, naive, good, escape, bad_metadata)

    result = run_sensor(dlm, dagster_instance)
    assert result.cursor == ids[-1]  # the cursor moves past the bad entries
    assert len(result.run_requests) == 1
    assert result.run_requests[0].run_config["ops"]["raw_export"]["config"]["ref_ids"] == [
        good["ref_id"]
    ]
    letters = streams.client.xrange(streams.dead_letter_stream)
    assert [f["dlm_source_id"] for _, f in letters] == [ids[0], ids[2], ids[3]]
    reasons = [f["dlm_reason"] for _, f in letters]
    assert "naive" in reasons[0] and "'..'" in reasons[1] and "metadata: not a JSON" in reasons[2]
    # the evidence is kept: every original field survives
    assert {k: v for k, v in letters[0][1].items() if not k.startswith("dlm_")} == naive
    assert catalog.get(naive["ref_id"]) is None and catalog.get(good["ref_id"]) is not None


def test_missing_folder_is_retried_then_recorded(
    dlm, dagster_instance, streams, catalog, root
) -> None:
    fields = make_event(root, write=False)
    publish(streams, fields)
    (outcome,) = materialize_requests(dlm, dagster_instance, run_sensor(dlm, dagster_instance))
    assert not outcome.success
    record = catalog.get(fields["ref_id"])
    assert record.status == EventStatus.FAILED
    assert "does not exist" in record.last_error and record.attempts == 6  # 1 + 5 retries
    failure = outcome.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert fields["ref_id"] in failure.description and "does not exist" in failure.description
    assert announcements(streams) == []

    # once the folder appears, re-materialising the partition (no ref_ids) exports it
    make_event(root, local_path=fields["local_path"])
    assert materialize_partition(dlm, dagster_instance, f"{TODAY}|prince").success
    assert catalog.get(fields["ref_id"]).status == EventStatus.VERIFIED


def test_one_failure_does_not_stop_the_others(
    dlm, dagster_instance, streams, catalog, root
) -> None:
    good = [make_event(root) for _ in range(3)]
    missing = make_event(root, write=False)
    publish(streams, good[0], missing, *good[1:])
    (outcome,) = materialize_requests(dlm, dagster_instance, run_sensor(dlm, dagster_instance))
    assert not outcome.success
    assert all(catalog.get(e["ref_id"]).status == EventStatus.VERIFIED for e in good)
    assert catalog.get(missing["ref_id"]).status == EventStatus.FAILED
    assert sorted(a["ref_id"] for a in announcements(streams)) == sorted(e["ref_id"] for e in good)


def test_key_collision_never_overwrites(
    dlm, dagster_instance, streams, object_store, catalog, root
) -> None:
    ts = datetime(2026, 11, 30, 12, 0, 0, 250000, tzinfo=UTC)
    # A foreign object (e.g. written by the legacy exporter) already holds the key.
    object_store.client.put_object(
        Bucket=object_store.bucket, Key="images/exp-a/20261130/120000.tar", Body=b"legacy"
    )
    # ... and two new events of one experiment fall in the same UTC second.
    first = make_event(root, timestamp=ts)
    second = make_event(root, timestamp=ts + timedelta(milliseconds=300))
    publish(streams, first, second)
    assert all(
        o.success
        for o in materialize_requests(dlm, dagster_instance, run_sensor(dlm, dagster_instance))
    )

    assert object_bytes(object_store, "images/exp-a/20261130/120000.tar") == b"legacy"
    records = [catalog.get(e["ref_id"]) for e in (first, second)]
    keys = {r.object_key for r in records}
    assert keys == {
        f"images/exp-a/20261130/120000-{first['ref_id']}.tar",
        f"images/exp-a/20261130/120000-{second['ref_id']}.tar",
    }
    assert all(r.key_collision for r in records)
    for record in records:
        assert sha256(object_bytes(object_store, record.object_key)) == record.sha256


def test_s3_down_then_back_retries_succeed(
    dagster_instance, streams, object_store, catalog, root, data_root, seaweedfs
) -> None:
    # Backoff from 2 s: 2+4+8+16+32 s of retries outlast SeaweedFS's restart.
    settings = make_settings(
        catalog, object_store, streams, data_root, export_retry_delay_seconds=2.0
    )
    dlm = build_definitions(settings)
    fields = make_event(root)
    publish(streams, fields)
    result = run_sensor(dlm, dagster_instance)
    seaweedfs.stop()
    restarter = threading.Timer(2.0, seaweedfs.start)
    restarter.start()
    try:
        (outcome,) = materialize_requests(dlm, dagster_instance, result)
    finally:
        restarter.join()
    assert outcome.success
    record = catalog.get(fields["ref_id"])
    assert record.status == EventStatus.VERIFIED and record.attempts >= 2
    assert sha256(object_bytes(object_store, record.object_key)) == record.sha256


KILLED_EXPORT = """
import sys
from dagster import materialize, DagsterInstance
from dlm_pipelines.definitions import defs
materialize([defs.resolve_assets_def("raw_export")], partition_key=sys.argv[1],
            instance=DagsterInstance.ephemeral())
"""


def test_upload_killed_midway_leaves_no_object_and_a_rerun_succeeds(
    dlm, settings, dagster_instance, streams, object_store, catalog, root
) -> None:
    fields = make_event(root, files={f"tile{i}.tif": os.urandom(4 << 20) for i in range(20)})
    publish(streams, fields)
    run_sensor(dlm, dagster_instance)  # into the catalog
    env = {
        **os.environ,
        "DLM_DATABASE_URL": settings.database_url,
        "DLM_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "DLM_S3_BUCKET": settings.s3_bucket,
        "DLM_REDIS_URL": settings.redis_url,
        "DLM_EXPORT_STREAM": settings.export_stream,
        "DLM_DATA_ROOT": str(root),
        "DLM_EXPORT_PART_SIZE_MIB": "5",
        "DLM_EXPORT_PART_CONCURRENCY": "1",
    }
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_EXPORT, f"{TODAY}|prince"], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until parts are on their way
            uploads = object_store.client.list_multipart_uploads(Bucket=object_store.bucket)
            if uploads.get("Uploads"):
                upload = uploads["Uploads"][0]
                parts = object_store.client.list_parts(
                    Bucket=object_store.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                if parts.get("Parts"):
                    break
            assert child.poll() is None, "the export finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no multipart upload started")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    record = catalog.get(fields["ref_id"])
    assert record.status == EventStatus.EXPORTING  # claimed by a run that is now dead
    assert object_store.head(record.object_key) is None  # no object, not even a partial one

    outcome = materialize_partition(dlm, dagster_instance, f"{TODAY}|prince")
    assert outcome.success
    record = catalog.get(fields["ref_id"])
    assert record.status == EventStatus.VERIFIED and record.attempts == 2
    assert sha256(object_bytes(object_store, record.object_key)) == record.sha256
    leftovers = object_store.client.list_multipart_uploads(Bucket=object_store.bucket)
    assert not leftovers.get("Uploads")  # the killed upload's parts were aborted


def test_force_reexports_only_what_still_exists(
    dlm, dagster_instance, streams, object_store, catalog, root
) -> None:
    kept, gone, same = make_event(root), make_event(root), make_event(root)
    publish(streams, kept, gone, same)
    materialize_requests(dlm, dagster_instance, run_sensor(dlm, dagster_instance))
    before = {e["ref_id"]: catalog.get(e["ref_id"]) for e in (kept, gone, same)}
    for path in (root / "prince" / gone["local_path"]).iterdir():
        path.unlink()
    (root / "prince" / gone["local_path"]).rmdir()
    (root / "prince" / kept["local_path"] / "late.tif").write_bytes(b"late")  # a superset

    outcome = materialize_partition(
        dlm,
        dagster_instance,
        f"{TODAY}|prince",
        {"ops": {"raw_export": {"config": {"force": True}}}},
    )
    assert outcome.success
    after_kept, after_gone = catalog.get(kept["ref_id"]), catalog.get(gone["ref_id"])
    assert after_kept.attempts == 2 and after_kept.verified_at > before[kept["ref_id"]].verified_at
    assert after_gone.attempts == 1 and after_gone.status == EventStatus.VERIFIED
    assert "late.tif" in {m.path for m in catalog.manifest(kept["ref_id"]).manifest().members}
    # an unchanged tree gives the same tar (deterministic): nothing to replace
    after_same = catalog.get(same["ref_id"])
    assert after_same.status == EventStatus.VERIFIED
    assert (after_same.sha256, after_same.etag, after_same.verified_at) == (
        before[same["ref_id"]].sha256,
        before[same["ref_id"]].etag,
        before[same["ref_id"]].verified_at,
    )
    metadata = outcome.asset_materializations_for_node("raw_export")[0].metadata
    reasons = metadata["skip reasons"].value
    assert "unchanged since export" in reasons[same["ref_id"]]
    assert "not re-exported" in reasons[gone["ref_id"]]
    assert "does not exist" in reasons[gone["ref_id"]]


def test_a_queued_run_absorbs_new_events(dlm, dagster_instance, streams, catalog, root) -> None:
    first = make_event(root)
    publish(streams, first)
    tick = run_sensor(dlm, dagster_instance)
    request = tick.run_requests[0]
    job = dlm.resolve_implicit_global_asset_job_def()
    dagster_instance.create_run_for_job(
        job_def=job,
        run_config=request.run_config,
        tags={**request.tags, "dagster/partition": request.partition_key},
        # QUEUED needs a code-location origin; NOT_STARTED waits the same way here.
        status=DagsterRunStatus.NOT_STARTED,
    )
    second = make_event(root)
    publish(streams, second)
    later = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    assert later.run_requests == []  # the queued run will take it
    # when that run starts, it exports both, though its config names only the first
    outcome = materialize_partition(
        dlm, dagster_instance, request.partition_key, request.run_config
    )
    assert outcome.success
    assert catalog.get(second["ref_id"]).status == EventStatus.VERIFIED


def test_a_warm_run_takes_new_events_until_it_idles(
    catalog, object_store, streams, data_root, dagster_instance, root
) -> None:
    """The sensor's run lingers: an event recorded while it runs is exported by it, and
    no other run is requested; once it has idled and stopped taking events, a new
    event gets a run of its own."""
    settings = make_settings(catalog, object_store, streams, data_root, export_linger_seconds=3)
    dlm = build_definitions(settings)
    first = make_event(root)
    publish(streams, first)
    tick = run_sensor(dlm, dagster_instance)
    (request,) = tick.run_requests
    assert request.tags[ACCEPTING_TAG] == "true"
    outcome: dict[str, object] = {}
    runner = threading.Thread(
        target=lambda: outcome.update(
            result=materialize_partition(
                dlm, dagster_instance, request.partition_key, request.run_config, request.tags
            )
        )
    )
    runner.start()
    deadline = time.monotonic() + 60
    while catalog.get(first["ref_id"]).status != EventStatus.VERIFIED:
        assert time.monotonic() < deadline and runner.is_alive()
        time.sleep(0.1)
    second = make_event(root)
    publish(streams, second)
    later = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    assert later.run_requests == []  # the warm run takes it
    runner.join(timeout=60)
    assert not runner.is_alive()
    result = outcome["result"]
    assert result.success  # type: ignore[attr-defined]
    run = dagster_instance.get_run_by_id(result.run_id)  # type: ignore[attr-defined]
    assert run.tags[ACCEPTING_TAG] == "false"
    assert catalog.get(second["ref_id"]).run_id == run.run_id
    assert catalog.get(second["ref_id"]).status == EventStatus.VERIFIED
    exported = result.asset_materializations_for_node("raw_export")[0].metadata  # type: ignore[attr-defined]
    assert exported["events"].value == 2

    third = make_event(root)
    publish(streams, third)
    last = run_sensor(dlm, dagster_instance, cursor=later.cursor)
    assert [r.partition_key for r in last.run_requests] == [request.partition_key]


def test_an_idle_tick_waits_for_the_next_entry(
    catalog, object_store, streams, data_root, dagster_instance, root
) -> None:
    """A tick that finds nothing waits on the stream and returns with an entry that
    arrives meanwhile, instead of leaving it to the daemon's next round of ticks."""
    settings = make_settings(catalog, object_store, streams, data_root, sensor_wait_seconds=5)
    dlm = build_definitions(settings)
    timer = threading.Timer(1.0, publish, args=(streams, make_event(root)))
    timer.start()
    started = time.monotonic()
    result = run_sensor(dlm, dagster_instance)
    waited = time.monotonic() - started
    timer.join()
    assert 0.9 < waited < 4.5
    assert len(result.run_requests) == 1


def test_a_tick_records_events_as_they_come_and_returns_when_a_run_is_needed(
    catalog, object_store, streams, data_root, dagster_instance, root
) -> None:
    """While a warm run accepts its partition's events, a tick keeps recording each
    entry the moment it arrives (the run takes it from the catalog); it returns at
    once with a run request when an event arrives for a partition without a run."""
    settings = make_settings(catalog, object_store, streams, data_root, sensor_wait_seconds=8)
    dlm = build_definitions(settings)
    warm = dagster_instance.create_run_for_job(
        job_def=dlm.resolve_implicit_global_asset_job_def(),
        tags={
            "dagster/partition": f"{TODAY}|prince",
            "dagster/partition/system": "prince",
            ACCEPTING_TAG: "true",
        },
        status=DagsterRunStatus.STARTED,
    )
    for_warm, for_cold = make_event(root), make_event(root, system="tsu-exp002")
    recorded_during_tick: list[bool] = []

    def arrive() -> None:
        publish(streams, for_warm)
        time.sleep(1.0)
        recorded_during_tick.append(catalog.get(for_warm["ref_id"]) is not None)
        publish(streams, for_cold)

    timer = threading.Timer(1.0, arrive)
    timer.start()
    started = time.monotonic()
    result = run_sensor(dlm, dagster_instance)
    took = time.monotonic() - started
    timer.join()
    assert recorded_during_tick == [True]
    assert [r.partition_key for r in result.run_requests] == [f"{TODAY}|tsu-exp002"]
    assert 1.9 < took < 5  # returned with the second event, not at the end of its 8 s
    assert dagster_instance.get_run_by_id(warm.run_id).tags[ACCEPTING_TAG] == "true"
    assert catalog.get(for_warm["ref_id"]).status == EventStatus.RECEIVED


def test_trimmed_stream_raises_an_alarm(dlm, dagster_instance, streams, root) -> None:
    ids = publish(streams, *[make_event(root) for _ in range(3)])
    first = run_sensor(dlm, dagster_instance, cursor=ids[0])
    assert first.cursor == ids[2] and not first.asset_events
    lost = publish(streams, make_event(root), make_event(root))
    streams.client.xdel(streams.imaging_event_stream, *lost)  # gone before we read them
    publish(streams, make_event(root))
    result = run_sensor(dlm, dagster_instance, cursor=first.cursor)
    (alarm,) = result.asset_events
    assert isinstance(alarm, AssetObservation)
    assert "lost entries after the cursor" in alarm.metadata["alarm"].value
    assert alarm.metadata["max_deleted_entry_id"].value == lost[-1]


def test_never_tried_events_without_a_run_are_swept(
    dlm, dagster_instance, streams, catalog, root
) -> None:
    fields = make_event(root)
    publish(streams, fields)
    tick = run_sensor(dlm, dagster_instance)  # the run request is "lost": never launched
    with catalog.engine.begin() as conn:
        conn.execute(sa.update(EVENTS).values(received_at=datetime.now(UTC) - timedelta(hours=1)))
    sweep = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    assert [r.partition_key for r in sweep.run_requests] == [f"{TODAY}|prince"]
    assert sweep.run_requests[0].tags["dlm/trigger"] == "sweep"
    assert all(o.success for o in materialize_requests(dlm, dagster_instance, sweep))
    assert catalog.get(fields["ref_id"]).status == EventStatus.VERIFIED


def test_a_silent_run_is_failed_and_its_events_exported_again(
    catalog, object_store, streams, data_root, dagster_instance, root
) -> None:
    settings = make_settings(
        catalog, object_store, streams, data_root, export_stale_after_seconds=1
    )
    dlm = build_definitions(settings)
    fields = make_event(root)
    publish(streams, fields)
    tick = run_sensor(dlm, dagster_instance)
    request = tick.run_requests[0]
    # A run that started, claimed the event, then died with its worker: STARTED forever.
    zombie = dagster_instance.create_run_for_job(
        job_def=dlm.resolve_implicit_global_asset_job_def(),
        run_config=request.run_config,
        tags={
            **request.tags,
            "dagster/partition": request.partition_key,
            "dagster/partition/system": "prince",
        },
        status=DagsterRunStatus.STARTED,
    )
    assert catalog.claim(fields["ref_id"], zombie.run_id, force=False, run_is_alive=lambda _: True)
    time.sleep(1.5)
    sweep = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    assert dagster_instance.get_run_by_id(zombie.run_id).status == DagsterRunStatus.FAILURE
    assert [r.partition_key for r in sweep.run_requests] == [request.partition_key]
    assert all(o.success for o in materialize_requests(dlm, dagster_instance, sweep))
    record = catalog.get(fields["ref_id"])
    assert record.status == EventStatus.VERIFIED and record.run_id != zombie.run_id
