"""End to end with real processes: events published in the legacy format are exported by
the daemon, listed and served by the API, located on tape, purged when safe, and
exported exactly once even when the daemon is killed in the middle of a batch."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
import redis

from dlm_pipelines.catalog import Catalog, EventStatus
from tests.conftest import load_fixture
from tests.integration.helpers import make_event

pytestmark = pytest.mark.e2e


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, stack=None, every: float = 1.0
) -> Any:
    """Poll `check` every `every` s until it returns something truthy; fail with `what`
    after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if stack is not None:
            broken = stack.failed_process()
            assert broken is None, f"{broken.name} died:\n{broken.tail()}"
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def catalog(stack) -> Catalog:
    return Catalog(database_url=stack.database_url)


@pytest.fixture(scope="module")
def streams(stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url, decode_responses=True)


@pytest.fixture(scope="module")
def api(stack) -> httpx.Client:
    token = stack.credentials["api_token"]
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        yield client


def publish(stack, streams, events: list[dict[str, str]]) -> None:
    for fields in events:
        streams.xadd(stack.settings.imaging_event_stream, fields)


def verified(catalog: Catalog, events: list[dict[str, str]]) -> bool:
    records = catalog.get_many([e["ref_id"] for e in events])
    return len(records) == len(events) and all(r.status == EventStatus.VERIFIED for r in records)


def announced(stack, streams) -> Counter[str]:
    entries = streams.xrange(stack.settings.export_stream)
    return Counter(fields["ref_id"] for _, fields in entries)


def test_events_are_exported_listed_and_downloadable(stack, catalog, streams, api) -> None:
    root = stack.data_root
    events = [make_event(root, experiment_id="e2e-exp") for _ in range(3)]
    events.append(make_event(root, system="tsu-exp002", experiment_id="e2e-exp"))
    publish(stack, streams, events)
    wait_for("every event verified", lambda: verified(catalog, events), 300, stack)

    counts = announced(stack, streams)
    assert all(counts[e["ref_id"]] == 1 for e in events)
    s3 = stack.s3_client()
    for fields in events:
        record = catalog.get(fields["ref_id"])
        body = s3.get_object(Bucket=record.bucket, Key=record.object_key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == record.sha256 and len(body) == record.size

    # The legacy listing shows them with presigned URLs that return the same bytes.
    now = datetime.now(UTC)
    page = api.get(
        "/api/1/exports",
        params={
            "start": (now - timedelta(hours=1)).isoformat(),
            "end": (now + timedelta(hours=1)).isoformat(),
            "limit": 99,
        },
    )
    assert page.status_code == 200, page.text
    listed = {item["ref_id"]: item for item in page.json()["data"]}
    assert {e["ref_id"] for e in events} <= set(listed)
    for fields in events:
        record = catalog.get(fields["ref_id"])
        download = httpx.get(listed[fields["ref_id"]]["url"], timeout=30)
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == record.sha256

        # The run that exported it lingers for new events (warm), then succeeds.
        def lifecycle_done(ref_id: str = fields["ref_id"]) -> dict | None:
            lifecycle = api.get(f"/api/1/events/{ref_id}").json()
            return lifecycle if lifecycle["run"]["status"] == "SUCCESS" else None

        lifecycle = wait_for("the exporting run to end", lifecycle_done, 120, stack)
        assert lifecycle["status"] == "verified"


def test_an_archive_message_shows_the_archive_location(stack, catalog, streams, api) -> None:
    root = stack.data_root
    events = [make_event(root, experiment_id="e2e-tape") for _ in range(2)]
    publish(stack, streams, events)
    wait_for("export", lambda: verified(catalog, events), 300, stack)
    records = catalog.get_many([e["ref_id"] for e in events])
    day = records[0].timestamp.strftime("%Y%m%d")
    message = load_fixture("archive_message.json")
    message["archives"] = [
        {
            "path": f"images/e2e-tape/{day}.tar",
            "src_keys": [f"{r.bucket}/{r.object_key}" for r in records],
        }
    ]
    connection = pika.BlockingConnection(pika.URLParameters(stack.settings.rabbitmq_url))
    channel = connection.channel()
    channel.exchange_declare("surf-data-archive", exchange_type="fanout", durable=False)
    channel.basic_publish(
        "surf-data-archive",
        "",
        json.dumps(message, indent=4).encode(),
        pika.BasicProperties(delivery_mode=2),
    )
    connection.close()

    def archive_listed() -> dict | None:
        data = api.get("/api/1/archives", params={"experiment_id": "e2e-tape"}).json()["data"]
        return data[0] if data else None

    archive = wait_for("the archive in the API", archive_listed, 60, stack)
    assert archive["path"] == f"images/e2e-tape/{day}.tar" and archive["member_count"] == 2
    detail = api.get(archive["url"]).json()  # the relative url, as legacy clients follow it
    assert {m["ref_id"] for m in detail["members"]} == {e["ref_id"] for e in events}
    for fields in events:
        lifecycle = api.get(f"/api/1/events/{fields['ref_id']}").json()
        assert lifecycle["archive"]["path"] == f"images/e2e-tape/{day}.tar"


def test_purge_removes_exactly_the_verified_folders(stack, catalog, streams) -> None:
    root: Path = stack.data_root
    prince = [make_event(root, experiment_id="e2e-purge") for _ in range(3)]
    other_system = make_event(root, system="tsu-exp002", experiment_id="e2e-purge")
    # a folder no event names, and an event whose path escapes through a symlink
    stray = root / "prince" / "Images" / "stray"
    stray.mkdir(parents=True)
    (stray / "keep.tif").write_bytes(b"stray")
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "keep.tif").write_bytes(b"outside")
    (root / "prince" / "Images" / "escape").symlink_to(outside)
    escape = make_event(root, local_path="Images/escape", write=False)
    publish(stack, streams, [*prince, other_system, escape])
    wait_for("export", lambda: verified(catalog, [*prince, other_system]), 300, stack)

    def purged() -> bool:
        return all(catalog.get(e["ref_id"]).purged_at is not None for e in prince)

    # lifespan 20 s, the schedule fires every minute
    wait_for("the purge schedule", purged, 200, stack)
    for fields in prince:
        assert not (root / "prince" / fields["local_path"]).exists()
        record = catalog.get(fields["ref_id"])
        assert record.bytes_freed and record.bytes_freed > 0
    assert (root / "tsu-exp002" / other_system["local_path"]).exists()
    assert (stray / "keep.tif").read_bytes() == b"stray"
    assert (outside / "keep.tif").read_bytes() == b"outside"
    assert catalog.get(escape["ref_id"]).status != EventStatus.VERIFIED
    assert catalog.get(escape["ref_id"]).purged_at is None


def test_daemon_killed_mid_batch_exports_every_event_exactly_once(stack, catalog, streams) -> None:
    root = stack.data_root
    events = [
        make_event(
            root,
            system=("prince", "tsu-exp003")[i % 2],
            experiment_id="e2e-kill",
            # 32 MB each, so a run's batch takes seconds: the kill below lands mid-batch
            # even on an idle machine, where 2 MB events were all verified within a poll.
            files={f"tile{j}.tif": bytes([i]) * (4 << 20) for j in range(8)},
        )
        for i in range(12)
    ]
    publish(stack, streams, events)

    def exporting() -> bool:
        records = catalog.get_many([e["ref_id"] for e in events])
        return any(r.status in (EventStatus.EXPORTING, EventStatus.VERIFIED) for r in records)

    wait_for("the first export to start", exporting, 120, stack, every=0.05)
    daemon = stack.processes["daemon"]
    daemon.kill()  # SIGKILL, mid-batch
    at_kill = Counter(r.status for r in catalog.get_many([e["ref_id"] for e in events]))
    print(f"daemon killed with the batch at {dict(at_kill)}")
    assert not verified(catalog, events), "the batch finished before the daemon was killed"
    daemon.start()
    wait_for(
        "every event verified after the restart", lambda: verified(catalog, events), 400, stack
    )

    counts = announced(stack, streams)
    assert {e["ref_id"]: counts[e["ref_id"]] for e in events} == {e["ref_id"]: 1 for e in events}
    s3 = stack.s3_client()
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=stack.settings.s3_bucket, Prefix="images/e2e-kill/")[
            "Contents"
        ]
    ]
    assert len(keys) == len(events) == len(set(keys))
