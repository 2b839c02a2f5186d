"""Reconciliation against real SeaweedFS, PostgreSQL, Redis and Dagster: each fault is
found by one run, shown by the API and as a failed asset check, and gone from the
next report once fixed; work in flight is never a finding."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dagster import DagsterEventType, EventRecordsFilter
from fastapi.testclient import TestClient

from dlm_api.app import create_app
from dlm_pipelines.archive_locations import parse_archive_message
from dlm_pipelines.catalog import Catalog, EventRecord, EventStatus, utcnow
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.events import TRASH_FOLDER, parse_imaging_event
from dlm_pipelines.exporter import Exporter
from dlm_pipelines.partitions import partition_key_for
from dlm_pipelines.reconciler import Reconciler, list_pages
from dlm_pipelines.resources import DataRoot, ObjectStore, RedisStreams
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY, load_fixture
from tests.integration.helpers import make_event, make_settings

pytestmark = pytest.mark.integration
SYSTEMS = ("prince", "tsu-exp002", "tsu-exp003")
TOKEN = "reconcile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVENTS = EventRecord.__table__  # type: ignore[attr-defined]


@dataclass
class Site:
    """Events made the way production makes them: folder, catalog row, real export."""

    catalog: Catalog
    store: ObjectStore
    streams: RedisStreams
    root: Path

    def add(
        self,
        *,
        experiment_id: str | None = None,
        timestamp: datetime | None = None,
        age: timedelta = timedelta(minutes=2),
        local_path: str | None = None,
    ) -> EventRecord:
        fields = make_event(
            self.root,
            experiment_id=experiment_id or f"exp-{uuid.uuid4().hex[:8]}",
            timestamp=timestamp,
            local_path=local_path,
        )
        event = parse_imaging_event(fields, SYSTEMS)
        self.catalog.record_events([(event, "0-1", partition_key_for(event))], utcnow() - age)
        return self.get(event.ref_id)

    def get(self, ref_id: str) -> EventRecord:
        record = self.catalog.get(ref_id)
        assert record is not None
        return record

    def export(self, record: EventRecord, *, force: bool = False) -> EventRecord:
        exporter = Exporter(
            catalog=self.catalog,
            store=self.store,
            streams=self.streams,
            data_root=DataRoot(path=str(self.root)),
            run_id=f"export-{uuid.uuid4().hex[:8]}",
            run_is_alive=lambda _other: False,
        )
        outcome = exporter.export(record, force=force)
        assert outcome.exported, outcome
        return self.get(record.ref_id)

    def exported(self, **kwargs: Any) -> EventRecord:
        return self.export(self.add(**kwargs))

    def update(self, ref_id: str, **values: Any) -> None:
        with self.catalog.engine.begin() as conn:
            conn.execute(sa.update(EVENTS).where(EVENTS.c.ref_id == ref_id).values(**values))

    def save(self, key: str) -> tuple[bytes, dict[str, str]]:
        got = self.store.client.get_object(Bucket=self.store.bucket, Key=key)
        return got["Body"].read(), got["Metadata"]

    def put(self, key: str, body: bytes, metadata: dict[str, str] | None = None) -> None:
        self.store.client.put_object(
            Bucket=self.store.bucket, Key=key, Body=body, Metadata=metadata or {}
        )

    def tag_archived(self, key: str) -> None:
        self.store.client.put_object_tagging(
            Bucket=self.store.bucket,
            Key=key,
            Tagging={"TagSet": [{"Key": "archived", "Value": "true"}]},
        )


@pytest.fixture
def site(catalog, object_store, streams, data_root) -> Site:
    return Site(catalog, object_store, streams, Path(data_root.path))


def legacy_tar(ref_id: str, experiment_id: str, timestamp: str) -> bytes:
    """A tar as the legacy exporter wrote it: the folder, then ./metadata.json."""
    metadata = json.loads(load_fixture("imaging_event_stitch.json")["metadata"])
    document = {
        "ref_id": ref_id,
        "experiment_id": experiment_id,
        "timestamp": timestamp,
        "type": "stitch",
        "system": "prince",
        "schema_version": "1a1",
        "metadata": metadata,
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo(".")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, content in (("./Img_r01_c01.tif", os.urandom(30_000)),):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        data = json.dumps(document, indent=4).encode()
        info = tarfile.TarInfo("./metadata.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def age_tree(path: Path, age: timedelta) -> None:
    stamp = time.time() - age.total_seconds()
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(folder, name), (stamp, stamp))
    os.utime(path, (stamp, stamp))


def run_job(site: Site, dagster_instance, **settings: Any):
    defs = build_definitions(
        make_settings(
            site.catalog, site.store, site.streams, DataRoot(path=str(site.root)), **settings
        )
    )
    return defs.resolve_job_def("reconcile").execute_in_process(
        instance=dagster_instance, raise_on_error=False
    )


def check_evaluations(instance) -> list[Any]:
    records = instance.get_event_records(
        EventRecordsFilter(event_type=DagsterEventType.ASSET_CHECK_EVALUATION), ascending=True
    )
    return [r.event_log_entry.dagster_event.event_specific_data for r in records]


def api_client(site: Site, dagster_instance) -> TestClient:
    settings = make_settings(
        site.catalog,
        site.store,
        site.streams,
        DataRoot(path=str(site.root)),
        api_tokens=f"ops:{TOKEN}",
    )
    return TestClient(create_app(settings, dagster_instance))


def by_subject(findings: list[dict[str, Any]]) -> dict[str, str]:
    return {f["ref_id"] or f["key"] or f["path"]: f["kind"] for f in findings}


def test_each_fault_is_found_shown_and_closed_once_fixed(site: Site, dagster_instance) -> None:
    now = utcnow()
    fine = site.exported(experiment_id="exp-fine")

    missing = site.exported()
    missing_copy = site.save(missing.object_key)
    site.store.client.delete_object(Bucket=site.store.bucket, Key=missing.object_key)

    overwritten = site.exported()
    original = site.save(overwritten.object_key)
    forged = os.urandom(len(original[0]))
    # Same size, our metadata copied over, within the upload's second (the listing's
    # LastModified cannot tell): only the ETag the export recorded does.
    site.put(overwritten.object_key, forged, original[1])

    legacy_key = "images/legacy-exp/20261101/101010.tar"
    legacy_ref = str(uuid.uuid4())
    site.put(legacy_key, legacy_tar(legacy_ref, "legacy-exp", "2026-11-01T10:10:10+00:00"))
    site.put("images/notes.txt", b"not a contract key: never a finding")

    # The sibling sorts before the event's files in a plain string order ('-' < '/'):
    # the walk must still see the event's own folder as named, and this one as not.
    fine_folder = Path(site.root / fine.system / fine.local_path)
    unannounced = fine_folder.with_name(fine_folder.name + "-unannounced")
    (unannounced / "sub").mkdir(parents=True)
    (unannounced / "sub" / "Img_r01_c01.tif").write_bytes(b"x" * 100)
    age_tree(unannounced, timedelta(hours=2))
    in_trash = site.root / "prince" / TRASH_FOLDER / str(uuid.uuid4())  # the purge's own
    in_trash.mkdir(parents=True)
    (in_trash / "Img_r01_c01.tif").write_bytes(b"t" * 10)
    age_tree(in_trash.parent, timedelta(hours=2))
    fresh_folder = site.root / "prince" / "Images" / "still-writing"
    fresh_folder.mkdir(parents=True)
    (fresh_folder / "a.tif").write_bytes(b"y")  # inside DLM_RECONCILE_GRACE: not yet

    gone = site.add()
    gone_folder = site.root / gone.system / gone.local_path
    gone_files = {p.name: p.read_bytes() for p in gone_folder.iterdir()}
    for path in gone_folder.iterdir():
        path.unlink()
    gone_folder.rmdir()

    failed = site.add()
    site.update(
        failed.ref_id,
        status=EventStatus.FAILED.value,
        claimed_at=now - timedelta(hours=2),
        last_error="boom",
    )

    tagged = site.exported(timestamp=now - timedelta(days=2))
    site.tag_archived(tagged.object_key)

    edited = site.exported()
    late = site.root / edited.system / edited.local_path / "added-later.tif"
    late.write_bytes(b"z")
    age_tree(late, timedelta(days=1))  # copied with its old mtime (rsync -a): no clock tells

    overdue = site.exported(timestamp=now - timedelta(days=5))
    site.update(overdue.ref_id, verified_at=now - timedelta(days=4))

    # --- one run finds every fault ---------------------------------------------------
    result = run_job(site, dagster_instance)
    assert not result.success  # alarms fail the run
    client = api_client(site, dagster_instance)
    page = client.get("/api/1/reconciliation", params={"limit": 500}, headers=AUTH).json()
    found = by_subject(page["findings"])
    unannounced_path = f"prince/{unannounced.relative_to(site.root / 'prince')}"
    assert found == {
        missing.ref_id: "object_missing",
        overwritten.ref_id: "object_mismatch",
        legacy_key: "object_without_event",
        unannounced_path: "unannounced_folder",
        gone.ref_id: "source_missing",
        failed.ref_id: "stuck",
        tagged.ref_id: "archive_recovered",
        overdue.ref_id: "not_archived",
        edited.ref_id: "changed_since_export",
    }, page["findings"]
    assert page["counts"] == Counter(found.values())
    assert page["count"] == 9 and page["ran_at"]
    severities = {f["kind"]: f["severity"] for f in page["findings"]}
    assert severities["object_missing"] == severities["object_mismatch"] == "alarm"
    assert severities["source_missing"] == severities["stuck"] == "alarm"
    assert severities["object_without_event"] == severities["changed_since_export"] == "warning"
    assert page["findings"][0]["severity"] == "alarm"  # alarms first
    mismatch = next(f for f in page["findings"] if f["kind"] == "object_mismatch")
    assert "ETag" in mismatch["detail"] and mismatch["key"] == overwritten.object_key
    changed = next(f for f in page["findings"] if f["kind"] == "changed_since_export")
    assert "1 added (added-later.tif)" in changed["detail"]
    paged = client.get("/api/1/reconciliation", params={"limit": 3, "offset": 3}, headers=AUTH)
    assert paged.json()["findings"] == page["findings"][3:6]
    only = client.get("/api/1/reconciliation", params={"kind": "stuck"}, headers=AUTH).json()
    assert [f["ref_id"] for f in only["findings"]] == [failed.ref_id] and only["count"] == 1
    assert client.get("/api/1/reconciliation").status_code == 401

    # The tape tag gave the export its location, marked as learnt by reconciliation.
    recovered = site.get(tagged.ref_id)
    day = tagged.object_key.split("/")[2]
    assert recovered.archive_path == f"images/{tagged.experiment_id}/{day}.tar"
    with site.catalog.engine.connect() as conn:
        origin = conn.scalar(sa.text("SELECT origin FROM archive_member WHERE ref_id = :r"),
                             {"r": tagged.ref_id})  # fmt: skip
    assert origin == "reconciled"

    # Failed asset checks: per partition on raw_export and tape_archive, and unowned.
    evaluations = check_evaluations(dagster_instance)
    failed_checks = {
        (e.asset_key.to_user_string(), e.check_name, e.partition): e.severity.value
        for e in evaluations
        if not e.passed
    }
    for record in (missing, overwritten, gone, failed, edited):
        assert failed_checks[("raw_export", "reconciled", record.partition_key)] == "ERROR"
    for record in (tagged, overdue):
        assert failed_checks[("tape_archive", "reconciled", record.partition_key)] == "WARN"
    assert failed_checks[("raw_export", "reconciled_unowned", None)] == "WARN"
    # The run's metadata: counts per kind and the first findings.
    failure = result.failure_data_for_node("reconcile_stores")
    metadata = {k: v.value for k, v in failure.user_failure_data.metadata.items()}
    assert metadata["per kind"] == dict(sorted(Counter(found.values()).items()))
    assert len(metadata["first findings"].records) == 9

    # --- fix every fault; the next report closes them ----------------------------------
    site.put(missing.object_key, *missing_copy)
    site.put(overwritten.object_key, *original)
    for path in sorted(unannounced.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    unannounced.rmdir()
    gone_folder.mkdir()
    for name, content in gone_files.items():
        (gone_folder / name).write_bytes(content)
    site.export(site.get(failed.ref_id))
    site.export(site.get(edited.ref_id), force=True)  # the S3 copy has the new file now
    message = {
        "job_id": str(uuid.uuid4()),
        "date": now.date().isoformat(),
        "archives": [
            {
                "path": f"images/{overdue.experiment_id}/{overdue.object_key.split('/')[2]}.tar",
                "src_keys": [f"{site.store.bucket}/{overdue.object_key}"],
            }
        ],
    }
    site.catalog.record_archive_messages([parse_archive_message(json.dumps(message))])
    # --adopt: the legacy object is recorded from its metadata.json (dlm reconcile).
    adopted = run_cli(site, "reconcile", "--adopt")
    assert adopted.returncode == 0, adopted.stdout + adopted.stderr
    assert f"adopt {legacy_key}: adopted" in adopted.stdout

    result = run_job(site, dagster_instance)
    assert result.success
    page = client.get("/api/1/reconciliation", headers=AUTH).json()
    assert page["findings"] == [] and page["counts"] == {}
    # The CLI's report closed the others, this one the legacy object's finding; the
    # job's checks pass again where they failed (dlm reconcile evaluates no check).
    passed = {
        (e.asset_key.to_user_string(), e.check_name, e.partition)
        for e in check_evaluations(dagster_instance)[len(evaluations) :]
        if e.passed
    }
    assert ("raw_export", "reconciled_unowned", None) in passed
    for record in (missing, overwritten, gone, failed, edited):
        assert ("raw_export", "reconciled", record.partition_key) in passed
    for record in (tagged, overdue):
        assert ("tape_archive", "reconciled", record.partition_key) in passed

    exports = client.get(
        "/api/1/exports",
        params={"start": "2026-10-01T00:00:00Z", "end": utcnow().isoformat()},
        headers=AUTH,
    ).json()
    listed = {item["ref_id"]: item for item in exports["data"]}
    assert listed[legacy_ref]["key"] == f"{site.store.bucket}/{legacy_key}"
    assert listed[legacy_ref]["experiment_id"] == "legacy-exp"


def run_cli(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DLM_DATABASE_URL": site.catalog.database_url,
        "DLM_S3_ENDPOINT_URL": site.store.endpoint_url or "",
        "DLM_S3_BUCKET": site.store.bucket,
        "DLM_DATA_ROOT": str(site.root),
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
    }
    return subprocess.run(
        [sys.executable, "-m", "dlm_pipelines.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dlm_reconcile_prints_the_report_and_exits_1_on_an_alarm(site: Site) -> None:
    lost = site.exported()
    site.store.client.delete_object(Bucket=site.store.bucket, Key=lost.object_key)
    done = run_cli(site, "reconcile")
    assert done.returncode == 1, done.stdout + done.stderr
    print(done.stdout)  # a sample report (pytest -s)
    assert "1 alarm(s)" in done.stdout
    [line] = [line for line in done.stdout.splitlines() if lost.ref_id in line]
    assert line.startswith("alarm") and "object_missing" in line and lost.object_key in line

    site.put(lost.object_key, b"")  # an empty object in its place is still wrong
    done = run_cli(site, "reconcile")
    assert done.returncode == 1 and "object_mismatch" in done.stdout


def test_work_in_flight_is_never_a_finding(site: Site) -> None:
    """An export and an archive message that land while the bucket is listed."""
    site.exported(experiment_id="aaa-first")  # listed before anything happens
    landing = site.add(experiment_id="zzz-landing")  # claimed and uploaded mid-scan
    archived = site.exported(experiment_id="zzz-archived", timestamp=utcnow() - timedelta(days=5))
    site.update(archived.ref_id, verified_at=utcnow() - timedelta(days=4))
    happened = []
    snapshot = threading.Event()

    class Watched(Catalog):
        def exports_under(self, bucket: str, prefix: str) -> Iterator[Any]:
            rows = super().exports_under(bucket, prefix)
            first = next(rows, None)  # runs the query: the scan's first catalog snapshot
            snapshot.set()
            if first is not None:
                yield first
                yield from rows

    def in_flight() -> None:
        assert snapshot.wait(60)
        site.export(landing)
        site.tag_archived(archived.object_key)
        message = {
            "job_id": str(uuid.uuid4()),
            "date": utcnow().date().isoformat(),
            "archives": [
                {
                    "path": f"images/zzz-archived/{archived.object_key.split('/')[2]}.tar",
                    "src_keys": [f"{site.store.bucket}/{archived.object_key}"],
                }
            ],
        }
        site.catalog.record_archive_messages([parse_archive_message(json.dumps(message))])
        happened.append(True)

    def listing(prefix: str) -> Iterator[list[Any]]:
        """The first object, then, once the catalog's snapshot is taken and the in-flight
        work happened, the rest of the bucket."""
        objects = [o for page in list_pages(site.store.client, site.store.bucket, prefix)
                   for o in page]  # fmt: skip
        if not objects:
            return
        yield objects[:1]
        if prefix == "images/":
            in_flight()
        for page in list_pages(site.store.client, site.store.bucket, prefix):
            yield [listed for listed in page if listed.key > objects[0].key]

    reconciler = Reconciler(
        catalog=Watched(database_url=site.catalog.database_url),
        client=site.store.client,
        bucket=site.store.bucket,
        data_root=site.root,
        systems=SYSTEMS,
        listing=listing,
    )
    report = reconciler.run()
    assert happened
    assert dict(report.counts) == {}, report.first
    assert report.scanned["objects"] == 3 and report.scanned["exports"] == 2
