"""`dlm status` and `GET /metrics`: the operator's facts from real stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import job, op
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dlm_api.app import create_app
from dlm_pipelines.catalog import utcnow
from dlm_pipelines.health import collect, last_successful_run, render
from dlm_pipelines.settings import Settings
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.integration.test_api import ALICE, AUTH, insert_event

pytestmark = pytest.mark.integration
DLM = str(Path(sys.executable).parent / "dlm")


@op
def nothing() -> None:
    pass


@job(name="purge")
def purge_stand_in() -> None:
    nothing()


@pytest.fixture
def settings(catalog, object_store, streams, data_root, rabbitmq_url) -> Settings:
    return Settings(
        database_url=catalog.database_url,
        s3_endpoint_url=object_store.endpoint_url,
        s3_bucket=object_store.bucket,
        redis_url=streams.url,
        dead_letter_stream=streams.dead_letter_stream,
        rabbitmq_url=rabbitmq_url,
        archive_dead_letter_queue=f"dlm-test-dead-{uuid.uuid4().hex[:8]}",  # never declared
        data_root=Path(data_root.path),
        systems=["prince", "tsu-exp002"],
        api_tokens=f"alice:{ALICE}",
        purge_min_free=0,
    )


@pytest.fixture
def trouble(catalog, streams):
    """A catalog and dead-letter stream with everything an operator must see."""
    now = utcnow()
    insert_event(catalog, size=1000)
    insert_event(catalog, size=500, purged_at=now, bytes_freed=700)
    insert_event(catalog, verified=False, received_at=now - timedelta(hours=2))
    insert_event(catalog, verified=False, status="failed", last_error="boom")
    insert_event(
        catalog, system="tsu-exp002", partition_key="x|tsu-exp002", status="needs_attention"
    )
    for n in range(2):
        streams.client.xadd(streams.dead_letter_stream, {"dlm_reason": f"bad {n}"})
    return now


def test_status_names_everything_that_needs_attention(settings, trouble, dagster_instance) -> None:
    purge_stand_in.execute_in_process(instance=dagster_instance)
    report = collect(settings, last_successful_run(dagster_instance))
    assert not report.ok
    prince, tsu = report.systems
    assert (prince.system, prince.backlog, prince.failed, prince.needs_attention) == (
        "prince",
        2,
        1,
        0,
    )
    assert prince.exported_bytes == 1500 and prince.purged_bytes == 700
    assert prince.oldest_unexported is not None
    assert trouble - prince.oldest_unexported > timedelta(hours=1, minutes=59)
    assert tsu.needs_attention == 1 and tsu.backlog == 0
    assert prince.disk_free_bytes and prince.disk_total_bytes
    assert report.last_purge is not None and utcnow() - report.last_purge < timedelta(minutes=5)
    assert report.last_reconciliation is None  # no reconcile job has run
    assert [(s.name, s.ok) for s in report.services] == [
        ("catalog", True), ("redis", True), ("s3", True), ("rabbitmq", True)
    ]  # fmt: skip
    since = f"{prince.oldest_unexported:%Y-%m-%d %H:%M}"
    assert report.attention == [
        "prince: 1 event(s) failed to export",
        f"prince: oldest unexported event waits since {since} UTC",
        "tsu-exp002: 1 event(s) need attention",
        f"{settings.dead_letter_stream}: 2 dead letter(s) in the last 24 h",
    ]
    screen = render(report)
    assert "4 thing(s) need attention" in screen.splitlines()[0]
    assert "needs attention:\n  - prince: 1 event(s) failed to export" in screen
    as_json = report.to_json()
    assert as_json["ok"] is False and as_json["systems"][0]["failed"] == 1
    json.dumps(as_json)  # serialisable as it is


def test_status_reports_a_store_that_does_not_answer(settings) -> None:
    broken = settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "purge_min_free": 100}
    )
    report = collect(broken, lambda _job: None, timeout=2)
    redis_check = next(s for s in report.services if s.name == "redis")
    assert redis_check.ok is False and "ConnectionError" in redis_check.detail
    assert any(line.startswith("redis does not answer") for line in report.attention)
    assert any("disk free, below DLM_PURGE_MIN_FREE (100%)" in line for line in report.attention)


def dlm_status(settings: Settings, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "dagster-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "DAGSTER_"))} | {
        "DAGSTER_HOME": str(home),
        "DLM_DATABASE_URL": settings.database_url,
        "DLM_S3_ENDPOINT_URL": str(settings.s3_endpoint_url),
        "DLM_S3_BUCKET": settings.s3_bucket,
        "DLM_REDIS_URL": settings.redis_url,
        "DLM_DEAD_LETTER_STREAM": settings.dead_letter_stream,
        "DLM_RABBITMQ_URL": str(settings.rabbitmq_url),
        "DLM_ARCHIVE_DEAD_LETTER_QUEUE": settings.archive_dead_letter_queue,
        "DLM_DATA_ROOT": str(settings.data_root),
        "DLM_SYSTEMS": ",".join(settings.systems),
        "DLM_PURGE_MIN_FREE": "0",
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
    }
    return subprocess.run(
        [DLM, "status", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def test_dlm_status_exits_0_when_all_is_well_and_1_when_not(settings, catalog, streams, tmp_path):
    calm = dlm_status(settings, tmp_path)
    assert calm.returncode == 0, calm.stdout + calm.stderr
    assert calm.stdout.splitlines()[0].endswith(": all well")
    assert "never" in calm.stdout  # no purge yet
    insert_event(catalog, verified=False, status="failed")
    troubled = dlm_status(settings, tmp_path, "--json")
    assert troubled.returncode == 1, troubled.stderr
    report = json.loads(troubled.stdout)
    assert report["ok"] is False
    assert report["attention"] == ["prince: 1 event(s) failed to export"]
    services = {s["name"]: s["ok"] for s in report["services"]}
    assert services == {"catalog": True, "redis": True, "s3": True, "rabbitmq": True}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_in_prometheus_text_format(settings, trouble, dagster_instance) -> None:
    purge_stand_in.execute_in_process(instance=dagster_instance)
    client = TestClient(create_app(settings, dagster_instance))
    assert client.get("/metrics").status_code == 401  # a token, like /api/1
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    got = samples(response.text)
    p, t = (("system", "prince"),), (("system", "tsu-exp002"),)
    assert got[("dlm_events", (("status", "verified"), ("system", "prince")))] == 2
    assert got[("dlm_events", (("status", "failed"), ("system", "prince")))] == 1
    assert got[("dlm_events", (("status", "needs_attention"), ("system", "tsu-exp002")))] == 1
    assert got[("dlm_export_backlog_events", p)] == 2
    assert got[("dlm_export_backlog_events", t)] == 0
    assert 7190 < got[("dlm_oldest_unexported_event_age_seconds", p)] < 7400
    assert got[("dlm_oldest_unexported_event_age_seconds", t)] == 0
    assert got[("dlm_exported_bytes", p)] == 1500 and got[("dlm_purged_bytes", p)] == 700
    assert got[("dlm_data_root_free_bytes", p)] > 0
    stream = (("queue", settings.dead_letter_stream),)
    assert got[("dlm_dead_letters", stream)] == 2
    assert got[("dlm_dead_letters_last_24h", stream)] == 2
    assert utcnow().timestamp() - got[("dlm_last_purge_timestamp_seconds", ())] < 300
    assert got[("dlm_last_reconciliation_timestamp_seconds", ())] == 0
    assert got[("dlm_service_up", (("service", "redis"),))] == 1
    assert got[("dlm_service_up", (("service", "s3"),))] == 1
    assert got[("dlm_attention_items", ())] == 4

    anonymous = settings.model_copy(update={"metrics_allow_anonymous": True})
    open_client = TestClient(create_app(anonymous, dagster_instance))
    assert open_client.get("/metrics").status_code == 200
    assert open_client.get("/api/1/events").status_code == 401  # only /metrics is opened
