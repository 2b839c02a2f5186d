"""The REST API against a real PostgreSQL catalog, SeaweedFS and a Dagster instance.

Catalog rows are inserted directly into the catalog's tables, as the export,
archive and purge pipelines would leave them.
"""

import logging
import os
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from dagster import asset, materialize
from fastapi.testclient import TestClient

from dlm_api.app import create_app
from dlm_api.tables import ARCHIVES, EVENTS, MEMBERS
from dlm_pipelines.catalog import ARCHIVE_JOBS, utcnow
from dlm_pipelines.settings import Settings

pytestmark = pytest.mark.integration

ALICE = "alice-token-0123456789"
BOB = "bob-token-9876543210"
AUTH = {"Authorization": f"Bearer {ALICE}"}
LEGACY_EXPORT_FIELDS = {"ref_id", "experiment_id", "timestamp", "type", "url", "uploaded_at"}


def insert_event(catalog, bucket: str = "bucket", *, verified: bool = True, **values: Any) -> dict:
    """One catalog row; verified ones carry an export (key, size, sha256, times)."""
    ref_id = str(uuid.uuid4())
    ts = values.pop("timestamp", utcnow() - timedelta(minutes=10))
    row: dict[str, Any] = {
        "ref_id": ref_id,
        "stream_id": "1-0",
        "system": "prince",
        "experiment_id": "exp-a",
        "event_type": "stitch",
        "timestamp": ts,
        "partition_key": f"{ts.astimezone(UTC).date()}|prince",
        "local_path": f"Images/{ref_id[:8]}",
        "img_count": 1,
        "metadata": {},
        "received_at": ts,
        "status": "received",
        "key_collision": False,
        "attempts": 0,
    }
    if verified:
        uploaded = values.pop("uploaded_at", utcnow() - timedelta(minutes=1))
        row |= {
            "status": "verified",
            "bucket": bucket,
            "object_key": f"images/exp-a/{ts:%Y%m%d}/{ts:%H%M%S}-{ref_id}.tar",
            "size": 10240,
            "sha256": "0" * 64,
            "uploaded_at": uploaded,
            "verified_at": uploaded,
            "attempts": 1,
        }
    row |= values
    with catalog.engine.begin() as conn:
        conn.execute(sa.insert(EVENTS), [row])
    return row


def insert_archive(catalog, path: str, members: list[tuple[str, str | None]]) -> str:
    archive_id = str(uuid.uuid5(uuid.NAMESPACE_URL, path))
    job_id = str(uuid.uuid4())
    kind, experiment_id, _ = path.split("/")
    with catalog.engine.begin() as conn:
        conn.execute(
            sa.insert(ARCHIVE_JOBS),
            [
                {
                    "job_id": job_id,
                    "date": utcnow().date(),
                    "archive_count": 1,
                    "received_at": utcnow(),
                    "message": {},
                }
            ],
        )
        conn.execute(
            sa.insert(ARCHIVES),
            [
                {
                    "id": archive_id,
                    "path": path,
                    "experiment_id": experiment_id,
                    "event_type": {"images": "stitch", "videos": "video"}[kind],
                    "created_at": utcnow(),
                    "job_id": job_id,
                }
            ],
        )
        if members:
            conn.execute(
                sa.insert(MEMBERS),
                [{"archive_id": archive_id, "member_key": k, "ref_id": r} for k, r in members],
            )
    return archive_id


def api_settings(catalog, object_store, tmp_path) -> Settings:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# scripts\ncarol: carol-token-from-file\n\n")
    return Settings(
        database_url=catalog.database_url,
        s3_endpoint_url=object_store.endpoint_url,
        s3_bucket=object_store.bucket,
        api_tokens=f"alice:{ALICE},bob:{BOB}",
        api_tokens_file=tokens_file,
        presign_expires=600,
        dagster_ui_url="http://dagster.example:3000/",
    )


@pytest.fixture
def settings(catalog, object_store, tmp_path) -> Settings:
    return api_settings(catalog, object_store, tmp_path)


@pytest.fixture
def client(settings, dagster_instance) -> TestClient:
    return TestClient(create_app(settings, dagster_instance))


def put_object(object_store, key: str) -> bytes:
    body = os.urandom(70_000)
    object_store.client.put_object(Bucket=object_store.bucket, Key=key, Body=body)
    return body


def seconds_left(url: str) -> float:
    """Remaining lifetime of a presigned URL (SigV4 or SigV2 query signing)."""
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    if "X-Amz-Expires" in query:
        signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        expires = signed + timedelta(seconds=int(query["X-Amz-Expires"]))
    else:
        expires = datetime.fromtimestamp(int(query["Expires"]), UTC)
    return (expires - utcnow()).total_seconds()


def aware(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, f"{value} has no offset"
    return parsed


def test_presigned_urls_serve_the_exported_bytes(client, catalog, object_store, caplog) -> None:
    row = insert_event(catalog, object_store.bucket)
    body = put_object(object_store, row["object_key"])

    caplog.set_level(logging.INFO, logger="dlm_api")
    page = client.get("/api/1/exports", headers=AUTH).json()
    [item] = page["data"]
    listed = httpx.get(item["url"], timeout=30)
    assert listed.status_code == 200 and listed.content == body
    assert 590 < seconds_left(item["url"]) <= 600  # never beyond DLM_PRESIGN_EXPIRES

    # A full page, signed with one cached signing key: every link works the same.
    for _ in range(150):
        insert_event(catalog, object_store.bucket, uploaded_at=utcnow() - timedelta(hours=2))
    page = client.get("/api/1/exports", headers=AUTH).json()
    assert page["count"] == 151 and len({i["url"] for i in page["data"]}) == 151
    assert page["data"][0]["ref_id"] == row["ref_id"]
    assert httpx.get(page["data"][0]["url"], timeout=30).content == body
    assert 590 < seconds_left(page["data"][-1]["url"]) <= 600

    # The permalink mints a new link on every call; it works like the listed one.
    link = client.get(
        f"/api/1/events/{row['ref_id']}/download", headers=AUTH, follow_redirects=False
    )
    assert link.status_code == 307
    assert link.headers["cache-control"] == "no-store"
    fetched = httpx.get(link.headers["location"], timeout=30)
    assert fetched.status_code == 200 and fetched.content == body
    assert 590 < seconds_left(link.headers["location"]) <= 600  # freshly minted
    # each minted link is on record with the token's name and the ref_id
    audit = [r.getMessage() for r in caplog.records if r.name == "dlm_api.downloads"]
    assert len(audit) == 3
    assert all("alice" in line and row["ref_id"] in line for line in audit)
    assert ALICE not in " ".join(audit)

    unverified = insert_event(catalog, verified=False)
    missing = client.get(f"/api/1/events/{unverified['ref_id']}/download", headers=AUTH)
    assert missing.status_code == 404 and "no verified export" in missing.json()["detail"]


def test_legacy_exports_contract(client, catalog) -> None:
    now = utcnow()
    listed = insert_event(catalog, experiment_id="exp-b")
    insert_event(catalog, event_type="video")  # other type: the default is stitch
    insert_event(catalog, uploaded_at=now - timedelta(hours=30))  # outside the last 24 h
    insert_event(catalog, verified=False)  # never uploaded: not an export

    response = client.get("/api/1/exports", headers=AUTH)
    assert response.status_code == 200
    page = response.json()
    assert page["count"] == 1
    [item] = page["data"]
    assert set(item) >= LEGACY_EXPORT_FIELDS
    assert item["ref_id"] == listed["ref_id"] and item["experiment_id"] == "exp-b"
    assert item["type"] == "stitch" and isinstance(item["url"], str) and item["url"]
    assert aware(item["timestamp"]) == listed["timestamp"]
    assert aware(item["uploaded_at"]) == listed["uploaded_at"]
    assert item["key"] == f"bucket/{listed['object_key']}" and item["size"] == 10240

    videos = client.get("/api/1/exports", params={"event_type": "video"}, headers=AUTH).json()
    assert videos["count"] == 1 and videos["data"][0]["type"] == "video"
    older = client.get(
        "/api/1/exports",
        params={"start": (now - timedelta(hours=48)).isoformat(), "end": now.isoformat()},
        headers=AUTH,
    ).json()
    assert older["count"] == 2

    naive = client.get("/api/1/exports", params={"start": "2026-01-01T00:00:00"}, headers=AUTH)
    assert naive.status_code == 422
    for bad in ({"limit": 501}, {"limit": 0}, {"offset": -1}, {"event_type": "movie"}):
        assert client.get("/api/1/exports", params=bad, headers=AUTH).status_code == 422


def test_exports_page_with_limit_99_in_a_stable_order(client, catalog) -> None:
    base = utcnow() - timedelta(hours=1)
    # pairs share an upload time, so the ref_id tie-break decides
    rows = [insert_event(catalog, uploaded_at=base + timedelta(seconds=i // 2)) for i in range(250)]
    expected = [r["ref_id"] for r in sorted(rows, key=lambda r: r["ref_id"])]
    expected.sort(
        key=lambda ref: next(r["uploaded_at"] for r in rows if r["ref_id"] == ref), reverse=True
    )

    first = client.get("/api/1/exports", params={"limit": 99}, headers=AUTH).json()
    window = {"start": first["start"], "end": first["end"]}  # pinned, as a careful client does
    seen, offset = [], 0
    while True:
        page = client.get(
            "/api/1/exports", params={"limit": 99, "offset": offset, **window}, headers=AUTH
        ).json()
        assert page["count"] == 250
        seen += [item["ref_id"] for item in page["data"]]
        offset += 99
        if offset >= page["count"]:
            break
    assert seen == expected  # every export once, newest first, ties by ref_id
    assert [i["ref_id"] for i in first["data"]] == expected[:99]


def test_archives_follow_the_relative_url(client, catalog) -> None:
    exported = insert_event(catalog, experiment_id="exp-a")
    member_key = f"bucket/{exported['object_key']}"
    archive_id = insert_archive(
        catalog,
        "images/exp-a/20261130.tar",
        [(member_key, exported["ref_id"]), ("bucket/images/exp-a/x/1.tar", None)],
    )
    insert_archive(catalog, "videos/exp-z/20261130.tar", [])

    listing = client.get("/api/1/archives", params={"experiment_id": "exp-a"}, headers=AUTH)
    assert listing.status_code == 200
    page = listing.json()
    assert page["count"] == 1
    [summary] = page["data"]
    assert summary["id"] == archive_id and summary["path"] == "images/exp-a/20261130.tar"
    assert summary["type"] == "stitch" and summary["member_count"] == 2
    aware(summary["created_at"])
    assert summary["url"] == f"/api/1/archives/{archive_id}"

    detail = client.get(urljoin(f"{client.base_url}/", summary["url"]), headers=AUTH).json()
    assert {k: detail[k] for k in ("id", "path", "type", "experiment_id")} == {
        "id": archive_id,
        "path": "images/exp-a/20261130.tar",
        "type": "stitch",
        "experiment_id": "exp-a",
    }
    known, unknown = detail["members"]
    assert known == {
        "member_key": member_key,
        "ref_id": exported["ref_id"],
        "timestamp": known["timestamp"],
        "checksum": "0" * 64,
        "size": 10240,
    }
    assert aware(known["timestamp"]) == exported["timestamp"]
    assert unknown["ref_id"] is None and unknown["checksum"] is None

    assert client.get("/api/1/archives", headers=AUTH).json()["count"] == 2
    gone = client.get(f"/api/1/archives/{uuid.uuid4()}", headers=AUTH)
    assert gone.status_code == 404 and gone.json() == {"detail": "item not found"}
    assert client.get("/api/1/archives", params={"limit": 101}, headers=AUTH).status_code == 422


@asset
def tiny_export() -> int:
    return 1


def test_event_lifecycle_from_catalog_and_dagster(client, catalog, dagster_instance) -> None:
    run_id = materialize([tiny_export], instance=dagster_instance).run_id
    insert_archive(catalog, "images/exp-a/20261130.tar", [])
    purged_at = utcnow()
    row = insert_event(
        catalog,
        run_id=run_id,
        archive_path="images/exp-a/20261130.tar",
        archived_at=purged_at,
        purged_at=purged_at,
        bytes_freed=9000,
    )
    event = client.get(f"/api/1/events/{row['ref_id']}", headers=AUTH).json()
    assert event["status"] == "verified" and event["system"] == "prince"
    assert aware(event["received_at"]) == row["received_at"]
    assert event["export"] == {
        "key": f"bucket/{row['object_key']}",
        "size": 10240,
        "sha256": "0" * 64,
        "uploaded_at": event["export"]["uploaded_at"],
        "verified_at": event["export"]["verified_at"],
        "download_url": f"/api/1/events/{row['ref_id']}/download",
    }
    assert aware(event["export"]["verified_at"]) == row["verified_at"]
    assert event["run"] == {
        "run_id": run_id,
        "status": "SUCCESS",
        "url": f"http://dagster.example:3000/runs/{run_id}",
    }
    archive_id = uuid.uuid5(uuid.NAMESPACE_URL, "images/exp-a/20261130.tar")
    assert event["archive"]["url"] == f"/api/1/archives/{archive_id}"
    assert event["purge"]["bytes_freed"] == 9000 and aware(event["purge"]["purged_at"])

    failed = insert_event(
        catalog, verified=False, status="failed", run_id="gone", last_error="S3 said 503"
    )
    event = client.get(f"/api/1/events/{failed['ref_id']}", headers=AUTH).json()
    assert event["export"] is None and event["archive"] is None and event["purge"] is None
    assert event["error"] == "S3 said 503" and event["run"]["status"] is None

    unknown = client.get(f"/api/1/events/{uuid.uuid4()}", headers=AUTH)
    assert unknown.status_code == 404 and "no event" in unknown.json()["detail"]
    assert client.get("/api/1/events/not%00an-id", headers=AUTH).status_code == 422


def test_events_search_filters_and_pages(client, catalog) -> None:
    now = utcnow()
    a = insert_event(catalog, timestamp=now - timedelta(hours=3), experiment_id="exp-a")
    b = insert_event(
        catalog,
        timestamp=now - timedelta(hours=2),
        system="tsu-exp002",
        experiment_id="exp-b",
        event_type="video",
    )
    c = insert_event(catalog, timestamp=now - timedelta(hours=1), verified=False)

    def refs(**params: Any) -> list[str]:
        page = client.get("/api/1/events", params=params, headers=AUTH).json()
        assert page["count"] == len(page["data"]) or "limit" in params
        return [e["ref_id"] for e in page["data"]]

    assert refs() == [c["ref_id"], b["ref_id"], a["ref_id"]]  # newest first
    assert refs(experiment_id="exp-b") == [b["ref_id"]]
    assert refs(system="tsu-exp002") == [b["ref_id"]]
    assert refs(event_type="video") == [b["ref_id"]]
    assert refs(status="received") == [c["ref_id"]]
    assert refs(
        start=(now - timedelta(hours=2.5)).isoformat(),
        end=(now - timedelta(minutes=90)).isoformat(),
    ) == [b["ref_id"]]
    assert refs(limit=1, offset=1) == [b["ref_id"]]
    summary = client.get("/api/1/events", headers=AUTH).json()["data"][-1]
    assert summary["url"] == f"/api/1/events/{a['ref_id']}" and aware(summary["timestamp"])
    for bad in (
        {"start": "2026-01-01T00:00"},
        {"limit": 0},
        {"offset": -5},
        {"status": "lost"},
        {"experiment_id": "a/b"},
        {"type": "video"},  # the filter is event_type: a misspelt one must not list all
    ):
        assert client.get("/api/1/events", params=bad, headers=AUTH).status_code == 422
    unknown = client.get("/api/1/events", params={"type": "video"}, headers=AUTH).json()
    assert unknown["detail"][0]["loc"] == ["query", "type"]


def test_daily_stats_count_and_sum_by_utc_day(client, catalog) -> None:
    now = utcnow()
    yesterday = now - timedelta(days=1)
    row = insert_event(catalog, timestamp=now, uploaded_at=now, purged_at=now, bytes_freed=500)
    insert_event(catalog, timestamp=now, verified=False)
    insert_event(catalog, timestamp=yesterday, uploaded_at=yesterday, size=7)
    insert_event(catalog, timestamp=now - timedelta(days=9), uploaded_at=now - timedelta(days=9))
    insert_archive(catalog, "images/exp-a/20261130.tar", [(row["object_key"], row["ref_id"])])

    stats = client.get("/api/1/daily-stats", headers=AUTH).json()
    assert [s["date"] for s in stats] == [now.date().isoformat(), yesterday.date().isoformat()]
    assert stats[0] == {
        "date": now.date().isoformat(),
        "event_count": 2,
        "export_count": 1,
        "archive_count": 1,
        "bytes_exported": 10240,
        "purge_count": 1,
        "bytes_purged": 500,
    }
    assert stats[1]["event_count"] == 1 and stats[1]["bytes_exported"] == 7


def test_every_api_route_needs_a_named_token(settings, dagster_instance) -> None:
    client = TestClient(create_app(settings, dagster_instance))
    routes = [
        "/api/1/exports",
        "/api/1/archives",
        "/api/1/daily-stats",
        "/api/1/events",
        f"/api/1/events/{uuid.uuid4()}",
        f"/api/1/events/{uuid.uuid4()}/download",
    ]
    for route in routes:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {ALICE}"},
            {"Authorization": f"Bearer {ALICE}x"},
        ):
            response = client.get(route, headers=headers)
            assert response.status_code == 401, (route, headers)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "detail" in response.json()
    for token in (ALICE, BOB, "carol-token-from-file"):  # from the variable and from the file
        assert client.get("/api/1/events", headers={"Authorization": f"Bearer {token}"}).is_success
    assert client.get("/health").status_code == 204
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").json()["components"]["securitySchemes"]

    anonymous = TestClient(create_app(settings.model_copy(update={"api_allow_anonymous": True})))
    assert anonymous.get("/api/1/events").status_code == 200
    assert (
        anonymous.get("/api/1/events", headers={"Authorization": "Bearer wrong"}).status_code == 401
    )


def test_dlm_api_serves_under_uvicorn(catalog, object_store, dagster_instance, tmp_path) -> None:
    """`dlm api` as users start it: a real server on a free loopback port."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    run_id = materialize([tiny_export], instance=dagster_instance).run_id
    row = insert_event(catalog, object_store.bucket, run_id=run_id)
    body = put_object(object_store, row["object_key"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {
        "DLM_DATABASE_URL": catalog.database_url,
        "DLM_S3_ENDPOINT_URL": object_store.endpoint_url,
        "DLM_S3_BUCKET": object_store.bucket,
        "DLM_API_TOKENS": f"alice:{ALICE}",
        "DLM_API_PORT": str(port),
        "DLM_API_WORKERS": "1",  # one uvicorn process starts faster
        "DAGSTER_HOME": dagster_instance.root_directory,
    }
    dlm = Path(sys.executable).parent / "dlm"
    log = (tmp_path / "api.log").open("w")
    server = subprocess.Popen([str(dlm), "api"], env=env, cwd=tmp_path, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 204:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "api.log").read_text()
            assert time.monotonic() < deadline, "dlm api did not answer /health within 60 s"
            time.sleep(0.2)
        with httpx.Client(base_url=base, headers=AUTH, timeout=30) as http:
            assert http.get("/api/1/exports", headers={"Authorization": ""}).status_code == 401
            [item] = http.get("/api/1/exports").json()["data"]
            assert httpx.get(item["url"], timeout=30).content == body
            redirect = http.get(f"/api/1/events/{row['ref_id']}/download")
            assert redirect.status_code == 307
            assert httpx.get(redirect.headers["location"], timeout=30).content == body
            # run status through DagsterInstance.get() on DAGSTER_HOME
            event = http.get(f"/api/1/events/{row['ref_id']}").json()
            assert event["run"]["status"] == "SUCCESS"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert "minted a download link for token alice" in (tmp_path / "api.log").read_text()
