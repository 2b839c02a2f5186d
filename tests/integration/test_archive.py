"""Archive locations end to end: tape-archiver messages on RabbitMQ → archive_sensor →
catalog (PostgreSQL) → runless materialisations of `tape_archive` in a real instance.

Each test has queues of its own (deleted afterwards). Most publish straight to their
queue; the sample test publishes through the archiver's exchange, as the archiver does.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pika
import pytest
import sqlalchemy as sa
from dagster import AssetKey, DagsterInstance, SensorResult, SkipReason, build_sensor_context
from pika.adapters.blocking_connection import BlockingChannel
from sqlmodel import col, select

from dlm_pipelines.archive_locations import archive_id, parse_archive_message
from dlm_pipelines.catalog import Archive, ArchiveJob, ArchiveMember, Catalog, EventRecord, migrate
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.events import parse_imaging_event
from dlm_pipelines.partitions import partition_key_for
from dlm_pipelines.resources.archive_queue import ARCHIVE_EXCHANGE, REASON_HEADER, ArchiveQueue
from dlm_pipelines.settings import Settings
from tests.conftest import FIXTURES, load_fixture

pytestmark = pytest.mark.integration

SYSTEMS = ("prince", "tsu-exp002", "tsu-exp003")
STITCH = load_fixture("imaging_event_stitch.json")
KIND_TO_TYPE = {"images": "stitch", "videos": "video", "overview": "overview"}
SAMPLES = [
    "archive_message.json",
    "archive_message_naive_date.json",
    "archive_message_empty_run.json",
]


# --- the broker, as a test sees it ---------------------------------------------------------


@contextmanager
def channel_on(url: str) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        connection.close()


def publish(url: str, bodies: list[bytes], queue: str | None = None) -> None:
    """Persistent, no content type, like the archiver; `queue` None: through its exchange."""
    with channel_on(url) as channel:
        channel.exchange_declare(ARCHIVE_EXCHANGE, exchange_type="fanout")  # the archiver's way
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish(
                ARCHIVE_EXCHANGE if queue is None else "",
                queue or "",
                body,
                pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
                mandatory=True,
            )


def ready(url: str, queue: str) -> int:
    with channel_on(url) as channel:
        return channel.queue_declare(queue, passive=True).method.message_count


def take_all(url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    out = []
    with channel_on(url) as channel:
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((properties, body))


def force_close(connection_name: str) -> None:
    """What a broker restart does to a consumer: the broker drops its connection."""
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    pids = [
        line.split("\t", 1)[0]
        for line in listing.splitlines()
        if f'{{"connection_name","{connection_name}"}}' in line
    ]
    assert pids, f"no broker connection named {connection_name}"
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "simulated broker restart"],
            timeout=30,
            check=True,
        )


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def archive_queue(rabbitmq_url: str) -> Iterator[ArchiveQueue]:
    name = f"dlm-test-archive-{uuid.uuid4().hex[:10]}"
    queue = ArchiveQueue(
        url=rabbitmq_url, queue=name, dead_letter_queue=f"{name}.dead-letter", timeout_seconds=5
    )
    with queue.connect():
        pass  # declares and binds the queues, as the first sensor tick would
    yield queue
    with channel_on(rabbitmq_url) as channel:
        channel.queue_delete(name)
        channel.queue_delete(f"{name}.dead-letter")


def definitions(catalog: Catalog, archive_queue: ArchiveQueue, **changes: object):
    settings = Settings(
        database_url=catalog.database_url,
        rabbitmq_url=archive_queue.url,
        archive_queue=archive_queue.queue,
        archive_dead_letter_queue=archive_queue.dead_letter_queue,
        partition_start_date="2026-01-01",
        **changes,
    )
    return build_definitions(settings)


@pytest.fixture
def dlm(catalog: Catalog, archive_queue: ArchiveQueue):
    return definitions(catalog, archive_queue)


def tick(defs, instance: DagsterInstance) -> SensorResult | SkipReason:
    sensor = defs.get_sensor_def("archive_sensor")
    with build_sensor_context(
        instance=instance, resources=defs.resources, definitions=defs
    ) as context:
        result = sensor(context)
    if isinstance(result, SensorResult):
        for event in result.asset_events:  # what the sensor daemon does with them
            instance.report_runless_asset_event(event)
    return result


def summary(result: SensorResult | SkipReason) -> str:
    skip = result.skip_reason if isinstance(result, SensorResult) else result
    return (skip.skip_message if skip else None) or ""


def catalogued_export(catalog: Catalog, key: str, system: str = "prince") -> str:
    """An imaging event exported under the bucket-prefixed `key`; returns its ref_id."""
    bucket, object_key = key.split("/", 1)
    kind, experiment_id, day, hms = object_key.removesuffix(".tar").split("/")
    timestamp = datetime.strptime(day + hms, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    fields = {
        **STITCH,
        "ref_id": str(uuid.uuid4()),
        "experiment_id": experiment_id,
        "timestamp": timestamp.isoformat(),
        "type": KIND_TO_TYPE[kind],
        "system": system,
    }
    event = parse_imaging_event(fields, SYSTEMS)
    catalog.record_events([(event, "1-0", partition_key_for(event))])
    assert catalog.assign_key(event.ref_id, bucket, object_key, collision=False)
    return event.ref_id


def message(archives: dict[str, list[str]], job_id: str | None = None) -> bytes:
    document = {
        "job_id": job_id or str(uuid.uuid4()),
        "date": "2026-12-01",
        "archives": [{"path": path, "src_keys": keys} for path, keys in archives.items()],
    }
    return json.dumps(document, indent=4).encode()


def jobs(catalog: Catalog, job_ids: list[str]) -> list[ArchiveJob]:
    with catalog.session() as session:
        return list(session.exec(select(ArchiveJob).where(col(ArchiveJob.job_id).in_(job_ids))))


def archives(catalog: Catalog, paths: list[str]) -> list[Archive]:
    with catalog.session() as session:
        return list(session.exec(select(Archive).where(col(Archive.path).in_(paths))))


def members(catalog: Catalog, path: str) -> dict[str, str | None]:
    with catalog.session() as session:
        rows = session.exec(
            select(ArchiveMember).where(ArchiveMember.archive_id == archive_id(path))
        )
        return {m.member_key: m.ref_id for m in rows}


def materialised(instance: DagsterInstance) -> dict[str, list]:
    records = instance.fetch_materializations(AssetKey("tape_archive"), limit=1000).records
    out: dict[str, list] = {}
    for record in records:
        event = record.asset_materialization
        assert event is not None and event.partition is not None
        out.setdefault(event.partition, []).append(event)
    return out


# --- the tests -----------------------------------------------------------------------------


def test_sample_messages_through_the_archivers_exchange(
    dlm, dagster_instance, catalog: Catalog, archive_queue: ArchiveQueue
) -> None:
    sample, naive = load_fixture(SAMPLES[0]), load_fixture(SAMPLES[1])
    keys = sample["archives"][0]["src_keys"] + naive["archives"][0]["src_keys"]
    ref_ids = {key: catalogued_export(catalog, key) for key in keys}

    publish(archive_queue.url or "", [(FIXTURES / name).read_bytes() for name in SAMPLES])
    result = tick(dlm, dagster_instance)
    assert isinstance(result, SensorResult), summary(result)

    recorded = {j.job_id: j for j in jobs(catalog, [load_fixture(n)["job_id"] for n in SAMPLES])}
    assert {(j.date.isoformat(), j.archive_count) for j in recorded.values()} == {
        ("2026-12-01", 1),
        ("2026-11-27", 1),
        ("2026-12-01", 0),
    }
    assert recorded[sample["job_id"]].message == sample
    paths = ["images/exp-a/20261130.tar", "images/exp-old/20261127.tar"]
    found = {a.path: a for a in archives(catalog, paths)}
    assert {(p, a.id, a.event_type, a.experiment_id) for p, a in found.items()} == {
        (paths[0], archive_id(paths[0]), "stitch", "exp-a"),
        (paths[1], archive_id(paths[1]), "stitch", "exp-old"),
    }
    assert members(catalog, paths[0]) == {k: ref_ids[k] for k in sample["archives"][0]["src_keys"]}
    for record in catalog.get_many(list(ref_ids.values())):
        assert record.archive_path in paths and record.archived_at is not None
    assert ready(archive_queue.url or "", archive_queue.queue) == 0  # all acked

    by_partition = materialised(dagster_instance)
    assert set(by_partition) == {"2026-11-30|prince", "2026-11-27|prince"}
    (exp_a,) = by_partition["2026-11-30|prince"]
    assert exp_a.metadata["archive_files"].value == [paths[0]]
    assert exp_a.metadata["member_counts"].value == {paths[0]: 2}
    assert exp_a.metadata["events_archived"].value == 2


def test_redelivery_creates_no_second_entry(
    dlm, dagster_instance, catalog: Catalog, archive_queue: ArchiveQueue
) -> None:
    sample = load_fixture(SAMPLES[0])
    path = sample["archives"][0]["path"]
    for key in sample["archives"][0]["src_keys"]:
        catalogued_export(catalog, key)
    body = (FIXTURES / SAMPLES[0]).read_bytes()
    url = archive_queue.url or ""

    publish(url, [body, body], queue=archive_queue.queue)
    assert "2 archive job(s) recorded (1 already known)" in summary(tick(dlm, dagster_instance))
    first = {
        r.ref_id: r.archived_at for r in catalog.get_many(list(members(catalog, path).values()))
    }

    publish(url, [body], queue=archive_queue.queue)
    tick(dlm, dagster_instance)

    assert len(jobs(catalog, [sample["job_id"]])) == 1
    (archive,) = archives(catalog, [path])
    assert archive.id == archive_id(path)
    assert len(members(catalog, path)) == 2
    again = {r.ref_id: r.archived_at for r in catalog.get_many(list(first))}
    assert again == first  # archived once, at the first delivery
    assert ready(url, archive_queue.queue) == 0


def test_batch_cut_by_the_broker_loses_nothing_and_duplicates_nothing(
    dagster_instance, catalog: Catalog, archive_queue: ArchiveQueue
) -> None:
    dlm = definitions(catalog, archive_queue, archive_batch_size=4)
    url = archive_queue.url or ""
    paths = [f"images/exp-{i}/20261130.tar" for i in range(6)]
    keys = {p: f"mycostreams-raw-data/{p.removesuffix('.tar')}/120000.tar" for p in paths}
    ref_ids = {p: catalogued_export(catalog, keys[p]) for p in paths}
    job_ids = [str(uuid.uuid4()) for _ in paths]
    bodies = [message({p: [keys[p]]}, job_id) for p, job_id in zip(paths, job_ids, strict=True)]
    publish(url, bodies, queue=archive_queue.queue)

    def cut_connection(_conn: object) -> None:
        # The batch of 4 is being committed and none of it is acked yet.
        force_close(archive_queue.connection_name)

    sa.event.listen(catalog.engine, "commit", cut_connection, once=True)
    try:
        first = tick(dlm, dagster_instance)
    finally:  # the engine is shared by the session's tests
        if sa.event.contains(catalog.engine, "commit", cut_connection):
            sa.event.remove(catalog.engine, "commit", cut_connection)

    assert isinstance(first, SensorResult)
    assert "4 archive job(s) recorded" in summary(first)
    assert "stopped early" in summary(first) and "CONNECTION_FORCED" in summary(first)
    assert sorted(j.job_id for j in jobs(catalog, job_ids)) == sorted(job_ids[:4])
    assert ready(url, archive_queue.queue) == 6  # the broker put the unacked 4 back
    archived_first = {r.ref_id: r.archived_at for r in catalog.get_many(list(ref_ids.values()))}

    for _ in range(5):
        if summary(tick(dlm, dagster_instance)).startswith("no archive notifications"):
            break
    assert ready(url, archive_queue.queue) == 0
    assert sorted(j.job_id for j in jobs(catalog, job_ids)) == sorted(job_ids)
    assert sorted(a.path for a in archives(catalog, paths)) == sorted(paths)
    for path in paths:
        assert members(catalog, path) == {keys[path]: ref_ids[path]}
    for record in catalog.get_many(list(ref_ids.values())):
        assert record.archive_path is not None and ref_ids[record.archive_path] == record.ref_id
        if archived_first[record.ref_id] is not None:  # the first 4: archived once, not again
            assert record.archived_at == archived_first[record.ref_id]
    assert set(materialised(dagster_instance)) == {"2026-11-30|prince"}


def test_malformed_bodies_are_dead_lettered_with_the_reason(
    dlm, dagster_instance, catalog: Catalog, archive_queue: ArchiveQueue
) -> None:
    url = archive_queue.url or ""
    good = json.loads((FIXTURES / SAMPLES[2]).read_bytes())
    bad = {
        b"this is not json {": "body is not JSON",
        b'["images/exp-a/20261130.tar"]': "body must be a JSON object",
        json.dumps({"job_id": "x", "date": "2026-12-01"}).encode(): "missing field(s): archives",
        json.dumps({**good, "date": "2026-13-01"}, indent=4).encode(): "date: '2026-13-01'",
    }
    publish(url, [*bad, json.dumps(good).encode()], queue=archive_queue.queue)

    result = tick(dlm, dagster_instance)
    assert "1 archive job(s) recorded" in summary(result)
    assert "4 dead-lettered" in summary(result)
    assert ready(url, archive_queue.queue) == 0  # acked from the main queue
    assert len(jobs(catalog, [good["job_id"]])) == 1

    dead = {body: properties for properties, body in take_all(url, archive_queue.dead_letter_queue)}
    assert set(dead) == set(bad)  # bodies untouched
    for body, expected in bad.items():
        headers = dead[body].headers or {}
        assert expected in headers[REASON_HEADER]
        assert headers["x-dlm-source-queue"] == archive_queue.queue
        assert dead[body].delivery_mode == pika.DeliveryMode.Persistent.value
    assert summary(tick(dlm, dagster_instance)).startswith("no archive notifications")


def test_a_poison_message_is_dead_lettered_alone_and_the_good_ones_recorded(
    dlm, dagster_instance, catalog: Catalog, archive_queue: ArchiveQueue
) -> None:
    """Issue 11: bodies that parse but the catalog refuses (NUL, lone surrogates) or that
    make the parser recurse too deep never block the queue or the good messages."""
    url = archive_queue.url or ""
    good = [message({f"images/exp-g{i}/20261130.tar": []}, str(uuid.uuid4())) for i in range(3)]
    poison = {
        message({"images/exp-nul/20261130.tar": []}, "job\u0000nul"): "refused",
        message({"images/exp-sur/20261130.tar": []}, "job\ud800surrogate"): "refused",
        b'{"job_id": "deep", "date": "2026-12-01", "archives": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}": "could not be handled: RecursionError",
    }
    bodies = [good[0], *list(poison)[:2], good[1], list(poison)[2], good[2]]
    publish(url, bodies, queue=archive_queue.queue)

    result = tick(dlm, dagster_instance)
    assert "3 archive job(s) recorded" in summary(result), summary(result)
    assert "3 dead-lettered" in summary(result)
    assert ready(url, archive_queue.queue) == 0  # nothing blocks the queue
    assert len(jobs(catalog, [json.loads(b)["job_id"] for b in good])) == 3
    dead = {body: properties for properties, body in take_all(url, archive_queue.dead_letter_queue)}
    assert set(dead) == set(poison)  # bodies untouched
    for body, expected in poison.items():
        assert expected in (dead[body].headers or {})[REASON_HEADER]
    assert summary(tick(dlm, dagster_instance)).startswith("no archive notifications")


def test_unknown_keys_are_kept_as_unmatched_members(
    dlm, dagster_instance, catalog: Catalog, archive_queue: ArchiveQueue
) -> None:
    url = archive_queue.url or ""
    path = "videos/exp-v/20261130.tar"
    known, unknown = (f"mycostreams-raw-data/videos/exp-v/20261130/12000{i}.tar" for i in (0, 1))
    known_ref = catalogued_export(catalog, known)
    body = message({path: [known, unknown, "no-bucket-prefix.tar"]})

    publish(url, [body], queue=archive_queue.queue)
    assert "2 unmatched key(s)" in summary(tick(dlm, dagster_instance))
    assert members(catalog, path) == {known: known_ref, unknown: None, "no-bucket-prefix.tar": None}
    (archive,) = archives(catalog, [path])
    assert archive.event_type == "video"

    # The export shows up late; a redelivery of the message now matches it.
    late_ref = catalogued_export(catalog, unknown)
    publish(url, [body], queue=archive_queue.queue)
    tick(dlm, dagster_instance)
    assert members(catalog, path)[unknown] == late_ref
    late = catalog.get(late_ref)
    assert late is not None and late.archive_path == path


def test_empty_run_is_recorded_as_a_job(
    dlm, dagster_instance, catalog: Catalog, archive_queue: ArchiveQueue
) -> None:
    empty = load_fixture(SAMPLES[2])
    publish(archive_queue.url or "", [(FIXTURES / SAMPLES[2]).read_bytes()], archive_queue.queue)
    result = tick(dlm, dagster_instance)
    assert isinstance(result, SensorResult) and result.asset_events == []
    (job,) = jobs(catalog, [empty["job_id"]])
    assert (job.date.isoformat(), job.archive_count) == ("2026-12-01", 0)
    with catalog.session() as session:
        assert session.exec(select(Archive).where(Archive.job_id == job.job_id)).first() is None
        assert session.exec(select(EventRecord)).first() is None


def test_broker_down_is_a_clear_skip(dagster_instance) -> None:
    settings = Settings(
        database_url="sqlite:///:memory:",
        rabbitmq_url="amqp://guest:s3cret@127.0.0.1:1/%2F",  # nothing listens on port 1
        partition_start_date="2026-01-01",
    )
    result = tick(build_definitions(settings), dagster_instance)
    assert isinstance(result, SkipReason)
    text = result.skip_message or ""
    assert "RabbitMQ unavailable" in text and "amqp://guest:***@127.0.0.1:1/%2F" in text
    assert "s3cret" not in text


def test_recording_works_on_the_sqlite_catalog_too(tmp_path) -> None:
    """SQLite is the catalog of the one-command dev stack."""
    catalog = Catalog(database_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    migrate(catalog.database_url)
    path, (key, other) = (
        "images/exp-a/20261130.tar",
        load_fixture(SAMPLES[0])["archives"][0]["src_keys"],
    )
    ref_id = catalogued_export(catalog, key)
    message = parse_archive_message((FIXTURES / SAMPLES[0]).read_bytes())

    first, again = catalog.record_archive_messages([message, message])
    assert first.first_delivery and not again.first_delivery
    assert catalog.record_archive_messages([message])[0].unmatched_keys == [other]
    assert members(catalog, path) == {key: ref_id, other: None}
    record = catalog.get(ref_id)
    assert record is not None and record.archive_path == path
