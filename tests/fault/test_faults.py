"""The fault suite (issue 11, item 5): outages of private services during intake and
export. Each scenario ends with every event exported exactly once (one object, one
announcement) and no partial object, without an operator: only sensor ticks and the
runs they request. Each prints the time from recovery to the last export.

The pipeline is driven in process (sensor ticks and `materialize` of what they
request) against a real Dagster instance; step retries are off and the sweep's
backoff is 1-4 s, so recovery is the sweep's doing and the suite stays short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dlm_pipelines.catalog import Catalog, EventStatus, migrate
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.dev.seaweedfs import SeaweedFS
from dlm_pipelines.resources import ObjectStore, RedisStreams
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.fault.services import PrivatePostgres, PrivateRedis
from tests.integration.helpers import make_event, make_settings, materialize_partition, run_sensor

pytestmark = pytest.mark.fault
S3_OUTAGE = 90.0  # seconds, as issue 11 names them
REDIS_FREEZE = 30.0
POSTGRES_OUTAGE = 30.0
RECOVERY_TIMEOUT = 120.0


@dataclass
class Pipeline:
    """Sensor ticks and the runs they request, as the daemon would do them."""

    dlm: Any
    instance: Any
    catalog: Catalog
    streams: RedisStreams
    store: ObjectStore
    cursor: str | None = None
    failed_ticks: int = 0
    failed_runs: int = 0
    published: list[str] = field(default_factory=list)

    def publish(self, root: Path, **kwargs: Any) -> str:
        fields = make_event(root, **kwargs)
        self.streams.client.xadd(self.streams.imaging_event_stream, fields)
        self.published.append(fields["ref_id"])
        return fields["ref_id"]

    def step(self) -> None:
        try:
            result = run_sensor(self.dlm, self.instance, cursor=self.cursor)
        except Exception:
            self.failed_ticks += 1  # an outage: the cursor stays, the next tick resumes
            time.sleep(0.5)
            return
        self.cursor = result.cursor
        for request in result.run_requests or []:
            try:
                outcome = materialize_partition(
                    self.dlm, self.instance, request.partition_key, request.run_config, request.tags
                )
                self.failed_runs += 0 if outcome.success else 1
            except Exception:
                self.failed_runs += 1

    def run_for(self, seconds: float, during: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if during is not None:
                during()
            self.step()
            time.sleep(0.2)

    def done(self) -> bool:
        try:
            records = self.catalog.get_many(self.published)
        except Exception:
            return False
        return len(records) == len(self.published) and all(
            r.status == EventStatus.VERIFIED and r.announced_at is not None for r in records
        )

    def until_done(self, recovered_at: datetime) -> float:
        """Drive until every event is verified and announced; seconds from recovery to
        the last verification."""
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while not self.done():
            assert time.monotonic() < deadline, (
                f"not every event completed {RECOVERY_TIMEOUT:.0f} s after recovery: "
                f"{Counter(r.status for r in self.catalog.get_many(self.published))}"
            )
            self.step()
            time.sleep(0.2)
        last = max(r.verified_at for r in self.catalog.get_many(self.published))
        return max(0.0, (last - recovered_at).total_seconds())

    def assert_exactly_once(self) -> None:
        records = {r.ref_id: r for r in self.catalog.get_many(self.published)}
        assert set(records) == set(self.published)
        announced = Counter(
            f["ref_id"] for _, f in self.streams.client.xrange(self.streams.export_stream)
        )
        assert announced == Counter(self.published), "not one announcement per event"
        listing = self.store.client.list_objects_v2(Bucket=self.store.bucket)
        objects = {o["Key"]: o["Size"] for o in listing.get("Contents", [])}
        assert sorted(objects) == sorted(r.object_key for r in records.values())
        for record in records.values():
            assert objects[record.object_key] == record.size
            head = self.store.head(record.object_key)
            assert head is not None and head["Metadata"]["sha256"] == record.sha256
        uploads = self.store.client.list_multipart_uploads(Bucket=self.store.bucket)
        assert not uploads.get("Uploads"), "a partial upload was left behind"


def report(scenario: str, seconds: float, pipeline: Pipeline) -> None:
    report_line(
        f"fault {scenario}: last export {seconds:.1f} s after recovery; "
        f"{len(pipeline.published)} events, {pipeline.failed_ticks} failed ticks, "
        f"{pipeline.failed_runs} failed runs"
    )


def report_line(line: str) -> None:
    """Printed (pytest -s), and appended to $DLM_FAULT_REPORT when set."""
    print(line)
    log = os.environ.get("DLM_FAULT_REPORT")
    if log:
        with open(log, "a") as out:
            out.write(line + "\n")


def fault_settings(catalog, store, streams, data_root, **overrides: Any):
    return make_settings(
        catalog,
        store,
        streams,
        data_root,
        export_max_retries=0,
        export_retry_backoff_seconds=1,
        export_retry_backoff_max_seconds=4,
        export_max_attempts=100,  # an outage must not exhaust them here
        sensor_sweep_after_seconds=2,
        **overrides,
    )


# --- private services -------------------------------------------------------------------


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path / "seaweedfs", TEST_ACCESS_KEY, TEST_SECRET_KEY)
    try:
        server.start(timeout=90)
        yield server
    finally:
        server.stop()  # SIGKILL by its PID


def _store(endpoint_url: str) -> ObjectStore:
    store = ObjectStore(
        bucket=f"dlm-fault-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint_url, part_size_mib=5
    )
    store.ensure_bucket()
    return store


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


def _streams(url: str) -> RedisStreams:
    prefix = f"dlm-fault:{uuid.uuid4().hex[:8]}"
    return RedisStreams(
        url=url,
        imaging_event_stream=f"{prefix}:new-imaging-event",
        export_stream=f"{prefix}:new-export",
        dead_letter_stream=f"{prefix}:dead-letter",
    )


# --- scenarios --------------------------------------------------------------------------


def test_s3_killed_for_90_s_while_events_arrive(
    private_s3, catalog, streams, data_root, dagster_instance
) -> None:
    store = _store(private_s3.endpoint_url)
    root = Path(data_root.path)
    dlm = build_definitions(fault_settings(catalog, store, streams, data_root))
    pipeline = Pipeline(dlm, dagster_instance, catalog, streams, store)
    for _ in range(3):
        pipeline.publish(root)
    pipeline.step()  # exported before the outage

    private_s3.stop()
    started = time.monotonic()

    def arrive() -> None:  # one event every 15 s of the outage
        if len(pipeline.published) < 3 + int(time.monotonic() - started) // 15:
            pipeline.publish(root)

    pipeline.run_for(S3_OUTAGE, during=arrive)
    private_s3.start(timeout=90)  # same ports, same data directory
    recovered_at = datetime.now(UTC)
    seconds = pipeline.until_done(recovered_at)
    assert pipeline.failed_runs > 0  # the outage was felt
    pipeline.assert_exactly_once()
    report("S3 killed 90 s", seconds, pipeline)


def test_redis_frozen_for_30_s_then_restarted_with_its_data(
    private_redis, catalog, object_store, data_root, dagster_instance
) -> None:
    streams = _streams(private_redis.url)
    root = Path(data_root.path)
    dlm = build_definitions(fault_settings(catalog, object_store, streams, data_root))
    pipeline = Pipeline(dlm, dagster_instance, catalog, streams, object_store)
    for _ in range(3):
        pipeline.publish(root)
    private_redis.freeze()
    threading.Timer(REDIS_FREEZE, private_redis.thaw).start()
    pipeline.run_for(REDIS_FREEZE)  # ticks time out; nothing read, nothing lost
    time.sleep(0.5)
    recovered_at = datetime.now(UTC)
    for _ in range(2):
        pipeline.publish(root)
    seconds = pipeline.until_done(recovered_at)
    report("Redis frozen 30 s", seconds, pipeline)

    # and restarted with its data (append-only file): intake resumes at the cursor
    private_redis.stop()
    private_redis.start()
    recovered_at = datetime.now(UTC)
    for _ in range(2):
        pipeline.publish(root)
    seconds = pipeline.until_done(recovered_at)
    assert pipeline.failed_ticks > 0
    pipeline.assert_exactly_once()
    report("Redis restarted", seconds, pipeline)


def test_catalog_postgres_stopped_for_30_s(
    private_postgres, object_store, streams, data_root, dagster_instance
) -> None:
    catalog = Catalog(database_url=private_postgres.url)
    migrate(catalog.database_url)
    root = Path(data_root.path)
    dlm = build_definitions(fault_settings(catalog, object_store, streams, data_root))
    pipeline = Pipeline(dlm, dagster_instance, catalog, streams, object_store)
    for _ in range(2):
        pipeline.publish(root)
    pipeline.step()
    private_postgres.stop()
    started = time.monotonic()

    def arrive() -> None:  # events keep coming while the catalog is away
        if len(pipeline.published) < 2 + int(time.monotonic() - started) // 10:
            pipeline.publish(root)

    pipeline.run_for(POSTGRES_OUTAGE, during=arrive)
    private_postgres.start()
    recovered_at = datetime.now(UTC)
    seconds = pipeline.until_done(recovered_at)
    assert pipeline.failed_ticks > 0
    pipeline.assert_exactly_once()
    report("PostgreSQL stopped 30 s", seconds, pipeline)


def test_dagster_instance_postgres_restarted(private_postgres, tmp_path, monkeypatch) -> None:
    """The instance's pooled sessions die with the server; the next operation reconnects."""
    from dagster import AssetKey, AssetMaterialization

    from tests.integration.test_instance_storage import postgres_instance

    key = AssetKey("restart_probe")
    with postgres_instance(tmp_path / "home", private_postgres.url, monkeypatch) as instance:
        instance.report_runless_asset_event(AssetMaterialization(key, metadata={"n": 1}))
        private_postgres.stop()
        private_postgres.start()
        instance.report_runless_asset_event(AssetMaterialization(key, metadata={"n": 2}))
        latest = instance.get_latest_materialization_event(key)
    assert latest is not None and latest.asset_materialization is not None
    assert latest.asset_materialization.metadata["n"].value == 2


KILLED_EXPORT = """
import sys
from dagster import materialize, DagsterInstance
from dlm_pipelines.definitions import defs
materialize([defs.resolve_assets_def("raw_export")], partition_key=sys.argv[1],
            instance=DagsterInstance.ephemeral())
"""


def test_run_worker_killed_mid_upload(
    catalog, object_store, streams, data_root, dagster_instance
) -> None:
    root = Path(data_root.path)
    settings = fault_settings(catalog, object_store, streams, data_root)
    dlm = build_definitions(settings)
    pipeline = Pipeline(dlm, dagster_instance, catalog, streams, object_store)
    pipeline.publish(root, files={f"tile{i}.tif": os.urandom(4 << 20) for i in range(8)})
    pipeline.publish(root)
    tick = run_sensor(dlm, dagster_instance)  # catalogued; the request goes to a worker
    pipeline.cursor = tick.cursor
    env = {
        **os.environ,
        "DLM_DATABASE_URL": settings.database_url,
        "DLM_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "DLM_S3_BUCKET": settings.s3_bucket,
        "DLM_REDIS_URL": settings.redis_url,
        "DLM_EXPORT_STREAM": settings.export_stream,
        "DLM_DATA_ROOT": str(root),
        "DLM_EXPORT_PART_SIZE_MIB": "5",
        "DLM_EXPORT_PART_CONCURRENCY": "1",
        "DLM_EXPORT_CONCURRENCY": "1",
    }
    today = datetime.now(UTC).date().isoformat()
    worker = subprocess.Popen(
        [sys.executable, "-c", KILLED_EXPORT, f"{today}|prince"], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until parts are on their way
            uploads = object_store.client.list_multipart_uploads(Bucket=object_store.bucket)
            if any(
                object_store.client.list_parts(
                    Bucket=object_store.bucket, Key=u["Key"], UploadId=u["UploadId"]
                ).get("Parts")
                for u in uploads.get("Uploads", [])
            ):
                break
            assert worker.poll() is None, "the export finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no multipart upload started")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    recovered_at = datetime.now(UTC)
    seconds = pipeline.until_done(recovered_at)  # the sweep takes over the dead claim
    pipeline.assert_exactly_once()
    report("run worker kill -9 mid-upload", seconds, pipeline)


def test_rabbitmq_unreachable_while_archive_messages_queue_up(
    catalog, rabbitmq_url, dagster_instance
) -> None:
    from dagster import SkipReason

    from dlm_pipelines.resources.archive_queue import ArchiveQueue
    from dlm_pipelines.settings import Settings
    from tests.fault.services import free_port
    from tests.integration.test_archive import (
        catalogued_export,
        channel_on,
        jobs,
        members,
        message,
        publish,
        ready,
        summary,
        tick,
    )

    name = f"dlm-fault-archive-{uuid.uuid4().hex[:10]}"
    queue = ArchiveQueue(
        url=rabbitmq_url, queue=name, dead_letter_queue=f"{name}.dead-letter", timeout_seconds=5
    )
    with queue.connect():
        pass  # declares and binds the queues, as the first tick against the broker did

    def definitions(url: str):
        return build_definitions(
            Settings(
                database_url=catalog.database_url,
                rabbitmq_url=url,
                archive_queue=queue.queue,
                archive_dead_letter_queue=queue.dead_letter_queue,
                partition_start_date="2026-01-01",
            )
        )

    # The sensor's broker address answers nothing (a broker down, a cut network).
    down = definitions(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    up = definitions(rabbitmq_url)
    try:
        paths = [f"images/exp-q{i}/20261130.tar" for i in range(6)]
        keys = {p: f"mycostreams-raw-data/{p.removesuffix('.tar')}/120000.tar" for p in paths}
        ref_ids = {p: catalogued_export(catalog, keys[p]) for p in paths}
        job_ids = [str(uuid.uuid4()) for _ in paths]
        for path, job_id in zip(paths, job_ids, strict=True):  # they queue up meanwhile
            publish(rabbitmq_url, [message({path: [keys[path]]}, job_id)], queue=queue.queue)
            result = tick(down, dagster_instance)
            assert isinstance(result, SkipReason) and "RabbitMQ unavailable" in summary(result)
        assert ready(rabbitmq_url, queue.queue) == len(paths)

        recovered = time.monotonic()
        for _ in range(10):
            if summary(tick(up, dagster_instance)).startswith("no archive notifications"):
                break
        seconds = time.monotonic() - recovered
        assert ready(rabbitmq_url, queue.queue) == 0
        assert ready(rabbitmq_url, queue.dead_letter_queue) == 0
        assert sorted(j.job_id for j in jobs(catalog, job_ids)) == sorted(job_ids)  # once each
        for path in paths:
            assert members(catalog, path) == {keys[path]: ref_ids[path]}
        for record in catalog.get_many(list(ref_ids.values())):
            assert record.archive_path in paths
        report_line(
            f"fault RabbitMQ unreachable: last archive message recorded {seconds:.1f} s "
            f"after recovery; {len(paths)} messages"
        )
    finally:
        with channel_on(rabbitmq_url) as channel:
            channel.queue_delete(queue.queue)
            channel.queue_delete(queue.dead_letter_queue)


KILLED_TICK = """
from dagster import DagsterInstance, build_sensor_context
from dlm_pipelines.definitions import defs
sensor = defs.get_sensor_def("imaging_event_sensor")
with build_sensor_context(
    instance=DagsterInstance.ephemeral(), resources=defs.resources, definitions=defs
) as context:
    sensor(context)
print("the tick finished before it could be killed", flush=True)
"""


def test_daemon_killed_mid_tick(
    catalog, object_store, streams, data_root, dagster_instance
) -> None:
    """The process evaluating the sensor dies mid-batch (dead letters written, the cursor
    never stored): the next tick reads the batch again and nothing is lost or doubled."""
    root = Path(data_root.path)
    settings = fault_settings(catalog, object_store, streams, data_root)
    dlm = build_definitions(settings)
    pipeline = Pipeline(dlm, dagster_instance, catalog, streams, object_store)
    junk_ids = []
    for i in range(400):
        if i % 20 == 0:
            pipeline.publish(root)
        junk = {**make_event(root, write=False), "timestamp": "not a time"}
        junk_ids.append(str(streams.client.xadd(streams.imaging_event_stream, junk)))
    env = {
        **os.environ,
        "DLM_DATABASE_URL": settings.database_url,
        "DLM_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "DLM_S3_BUCKET": settings.s3_bucket,
        "DLM_REDIS_URL": settings.redis_url,
        "DLM_IMAGING_EVENT_STREAM": settings.imaging_event_stream,
        "DLM_EXPORT_STREAM": settings.export_stream,
        "DLM_DEAD_LETTER_STREAM": settings.dead_letter_stream,
        "DLM_DATA_ROOT": str(root),
        "DLM_PARTITION_START_DATE": "2026-01-01",
    }
    daemon = subprocess.Popen(
        [sys.executable, "-c", KILLED_TICK],
        env=env,
        start_new_session=True,
        text=True,
        stdout=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while streams.client.xlen(streams.dead_letter_stream) < 50:  # mid-batch
            assert daemon.poll() is None, daemon.stdout.read() if daemon.stdout else ""
            assert time.monotonic() < deadline, "the tick never started dead-lettering"
            time.sleep(0.01)
    finally:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
    assert streams.client.xlen(streams.dead_letter_stream) < len(junk_ids)  # cut short
    recovered_at = datetime.now(UTC)
    seconds = pipeline.until_done(recovered_at)  # from the cursor the daemon never stored
    pipeline.assert_exactly_once()
    lettered = {f["dlm_source_id"] for _, f in streams.client.xrange(streams.dead_letter_stream)}
    assert lettered == set(junk_ids)  # each at least once (the cut batch is read again)
    report("daemon kill -9 mid-tick", seconds, pipeline)
