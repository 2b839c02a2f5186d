"""Custody you can prove (issue 12), against real SeaweedFS and PostgreSQL: the four
ways the purge and re-exports used to lose data, the path tricks, and the manifest a
user checks an extracted download with."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient

from dlm_api.app import create_app
from dlm_pipelines.catalog import EVENTS, MANIFESTS, EventStatus
from dlm_pipelines.exporter import event_from_record
from dlm_pipelines.manifest_backfill import backfill
from dlm_pipelines.purge_policy import Why
from dlm_pipelines.purger import CHANGED_LOCALLY, CONTAINS_OTHERS, UNSAFE_SOURCE
from dlm_pipelines.resources import ObjectStore
from dlm_pipelines.resources.object_store import VerificationError
from tests.integration.helpers import NoConditionalWrites, hooked, untar
from tests.integration.test_api import AUTH, api_settings
from tests.integration.test_purge import YOUNG, Lab
from tests.integration.test_tar_stream import leftovers

pytestmark = pytest.mark.integration
OLD_MTIME = 1_600_000_000  # 2020: what `cp -p`, `rsync -a` or a lagging file server leave


@pytest.fixture
def lab(catalog, object_store, streams, data_root) -> Lab:
    return Lab(catalog, object_store, streams, Path(data_root.path))


@pytest.fixture
def client(catalog, object_store, tmp_path, dagster_instance) -> TestClient:
    return TestClient(create_app(api_settings(catalog, object_store, tmp_path), dagster_instance))


def object_bytes(lab: Lab, key: str) -> bytes:
    return bytes(lab.store.client.get_object(Bucket=lab.store.bucket, Key=key)["Body"].read())


def other_client(lab: Lab) -> Any:
    """Another writer, with a client of its own."""
    return boto3.client(
        "s3", endpoint_url=lab.store.endpoint_url, region_name=lab.store.region_name
    )


# --- the four losses ------------------------------------------------------------------------


def test_same_size_bytes_with_copied_metadata_are_never_trusted(lab) -> None:
    record = lab.add_exported(files={"a.tif": os.urandom(5000)})
    assert record.object_key and record.etag
    head = lab.store.head(record.object_key)
    assert head is not None
    forged = os.urandom(head["ContentLength"])
    lab.store.client.put_object(
        Bucket=lab.store.bucket, Key=record.object_key, Body=forged, Metadata=head["Metadata"]
    )

    outcome = lab.purge()[record.ref_id]

    assert outcome.why is None and outcome.alarm is not None and "ETag" in outcome.alarm
    assert (lab.source(record) / "a.tif").exists()
    assert lab.get(record.ref_id).status == EventStatus.NEEDS_ATTENTION


def test_a_file_added_with_an_old_mtime_is_kept_and_named(lab) -> None:
    record = lab.add_exported()
    late = lab.source(record) / "copied-late.tif"
    late.write_bytes(b"never exported")
    os.utime(late, (OLD_MTIME, OLD_MTIME))

    outcome = lab.purge()[record.ref_id]

    assert outcome.skip is not None and outcome.skip.reason == CHANGED_LOCALLY
    assert "copied-late.tif" in outcome.skip.detail and "added" in outcome.skip.detail
    assert late.read_bytes() == b"never exported"
    after = lab.get(record.ref_id)
    assert after.status == EventStatus.VERIFIED and after.purged_at is None
    assert after.last_error is not None and "copied-late.tif" in after.last_error  # lifecycle


def test_a_removal_failing_halfway_leaves_the_event_purged_and_the_object_whole(
    lab, tmp_path
) -> None:
    record = lab.add_exported(files={f"f{i}.tif": os.urandom(3000) for i in range(6)})
    assert record.object_key
    stored = object_bytes(lab, record.object_key)
    stuck = lab.source(record) / "f3.tif"
    subprocess.run(["chattr", "+i", str(stuck)], check=True)  # ext4 here; root can
    try:
        outcome = lab.purge()[record.ref_id]

        assert outcome.why == Why.LIFESPAN and outcome.error and "removal failed" in outcome.error
        assert not lab.source(record).exists()  # renamed away as one step
        after = lab.get(record.ref_id)
        assert after.purged_at is not None and after.trash_path
        assert Path(after.trash_path).is_dir()  # half removed, recorded

        forced = lab.exporter("forced").export(after, force=True)
        assert not forced.exported
        assert object_bytes(lab, record.object_key) == stored
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=False)
        subprocess.run(
            ["chattr", "-i", str(lab.root / "prince" / ".dlm-trash" / record.ref_id / "f3.tif")],
            check=False,
        )

    lab.purge()  # the next run finishes the removal from the trash
    assert not Path(after.trash_path).exists() and lab.get(record.ref_id).trash_path is None


def test_a_forced_reexport_of_half_a_folder_is_refused(lab) -> None:
    record = lab.add_exported(files={f"f{i}.tif": os.urandom(3000) for i in range(4)})
    assert record.object_key
    stored = object_bytes(lab, record.object_key)
    (lab.source(record) / "f1.tif").unlink()  # what a delete failing halfway used to leave
    (lab.source(record) / "f2.tif").write_bytes(b"short")

    outcome = lab.exporter("forced").export(lab.get(record.ref_id), force=True)

    assert not outcome.exported and outcome.error and outcome.permanent
    assert "f1.tif" in outcome.error and "f2.tif" in outcome.error
    assert object_bytes(lab, record.object_key) == stored
    assert lab.get(record.ref_id).status == EventStatus.VERIFIED


def test_an_archived_object_is_never_replaced(lab) -> None:
    record = lab.add_exported()
    assert record.object_key
    stored = object_bytes(lab, record.object_key)
    lab.store.client.put_object_tagging(
        Bucket=lab.store.bucket,
        Key=record.object_key,
        Tagging={"TagSet": [{"Key": "archived", "Value": "true"}]},
    )
    (lab.source(record) / "more.tif").write_bytes(b"a superset")

    outcome = lab.exporter("forced").export(lab.get(record.ref_id), force=True)

    assert not outcome.exported and outcome.error and "on tape" in outcome.error
    assert object_bytes(lab, record.object_key) == stored


MULTIPART = {"big.tif": os.urandom(6 << 20)}  # over the test store's 5 MiB part: no single PUT


def test_a_writer_between_upload_and_copy_is_never_described_by_our_sha256(lab) -> None:
    record = lab.add(files=MULTIPART)
    theirs = os.urandom(4000)
    writer = other_client(lab)

    def write_before_copy(params: dict[str, Any], **_: Any) -> None:
        writer.put_object(Bucket=params["Bucket"], Key=params["Key"], Body=theirs)

    # after our upload completed, before the copy that stamps its sha256
    with hooked(lab.store.client, "provide-client-params.s3.CopyObject", write_before_copy):
        outcome = lab.exporter().export(record, force=False)

    assert not outcome.exported and outcome.error and "PreconditionFailed" in outcome.error
    after = lab.get(record.ref_id)
    assert after.status == EventStatus.FAILED and after.verified_at is None
    assert after.object_key
    head = lab.store.head(after.object_key)
    assert head is not None and "sha256" not in head.get("Metadata", {})
    assert object_bytes(lab, after.object_key) == theirs


def test_a_key_taken_before_completion_is_not_overwritten(lab) -> None:
    record = lab.add(files=MULTIPART)
    theirs = os.urandom(4000)
    writer = other_client(lab)
    taken: list[str] = []

    def write_before_complete(params: dict[str, Any], **_: Any) -> None:
        if not taken:  # once: the first key the exporter tries
            taken.append(params["Key"])
            writer.put_object(Bucket=params["Bucket"], Key=params["Key"], Body=theirs)

    # after the exporter chose the key, before its upload completes
    hook = "provide-client-params.s3.CompleteMultipartUpload"
    with hooked(lab.store.client, hook, write_before_complete):
        outcome = lab.exporter().export(record, force=False)

    # The completion was refused; the export moved to the collision-free key.
    assert outcome.exported and outcome.key and taken and outcome.key != taken[0]
    assert object_bytes(lab, taken[0]) == theirs
    exported = lab.get(record.ref_id)
    assert exported.key_collision and exported.object_key == outcome.key
    assert hashlib.sha256(object_bytes(lab, outcome.key)).hexdigest() == exported.sha256


def test_a_retry_never_replaces_an_object_that_took_its_key(lab) -> None:
    """An earlier attempt recorded the key and died; an outside writer took the key
    since. The retry leaves their object alone and takes the collision-free key."""
    record = lab.add(files=MULTIPART)
    event = event_from_record(record)
    assert lab.catalog.claim(record.ref_id, "killed-run", force=False, run_is_alive=bool)
    assert lab.catalog.assign_key(
        record.ref_id, lab.store.bucket, event.object_key, collision=False
    )
    lab.catalog.mark_failed(record.ref_id, "killed-run", "the run worker was killed")
    theirs = os.urandom(4000)
    other_client(lab).put_object(Bucket=lab.store.bucket, Key=event.object_key, Body=theirs)

    outcome = lab.exporter().export(lab.get(record.ref_id), force=False)

    assert outcome.exported and outcome.key == event.collision_free_key
    assert object_bytes(lab, event.object_key) == theirs
    exported = lab.get(record.ref_id)
    assert exported.key_collision and exported.object_key == outcome.key
    assert hashlib.sha256(object_bytes(lab, outcome.key)).hexdigest() == exported.sha256


# --- stores without conditional writes: the HEAD fallback --------------------------------
# Where a store answers 501 NotImplemented to If-None-Match / If-Match, ObjectStore
# HEADs the key, then makes the same write without the condition. The proxy is such a
# store in front of the test's SeaweedFS bucket; `object_store` reaches it directly.
# Run them: uv run pytest tests/integration/test_custody.py -k fallback

ONE_PART = {"a.tif": os.urandom(3000), "sub/b.tif": os.urandom(100)}  # one PutObject
UPLOAD_PATHS = pytest.mark.parametrize(
    "files", [ONE_PART, MULTIPART], ids=["single-put", "multipart"]
)
NEW = {"IfNoneMatch": "*"}


@pytest.fixture
def proxy(object_store) -> Iterator[NoConditionalWrites]:
    with NoConditionalWrites(object_store.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def no_conditions(object_store, proxy) -> ObjectStore:
    """The test's bucket, through the proxy."""
    return ObjectStore(
        bucket=object_store.bucket,
        endpoint_url=proxy.url,
        part_size_mib=object_store.part_size_mib,
    )


def upload_through(
    store: ObjectStore, tmp_path: Path, files: dict[str, bytes], key: str, condition: dict
) -> Any:
    source = tmp_path / uuid.uuid4().hex
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    return store.upload_tar(
        source=source,
        metadata={"ref_id": "r1", "timestamp": "2026-01-01T00:00:00+00:00"},
        key=key,
        ref_id="r1",
        condition=condition,
    )


def stored(store: ObjectStore, key: str) -> bytes:
    return bytes(store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read())


def put_directly(store: ObjectStore, key: str, data: bytes) -> str:
    """Another writer, straight to SeaweedFS; returns the new object's ETag."""
    return str(store.client.put_object(Bucket=store.bucket, Key=key, Body=data)["ETag"])


def assert_is_the_upload(store: ObjectStore, key: str, result: Any, files: dict) -> None:
    """The object holds exactly the uploaded tar, its sha256 recorded, nothing left open."""
    assert result.sha256_in_metadata == (files is ONE_PART)  # the path the case is about
    body = stored(store, key)
    assert (len(body), hashlib.sha256(body).hexdigest()) == (result.size, result.sha256)
    store.verify_object(key, size=result.size, sha256=result.sha256, ref_id="r1")
    assert leftovers(store, key) == ([key], [])


def refused_writes(proxy: NoConditionalWrites, header: str, files: dict) -> int:
    """How many conditional writes the proxy refused; each the write the path makes."""
    for refused in proxy.refused:
        method, path, headers = refused.split(" ", 2)
        if files is ONE_PART:
            assert (method, "?" in path) == ("PUT", False), refused  # PutObject
        else:
            assert method == "POST" and "?uploadId=" in path, refused  # CompleteMultipartUpload
        assert headers == header, refused
    return len(proxy.refused)


@UPLOAD_PATHS
def test_fallback_writes_a_new_key_after_a_head(
    object_store, no_conditions, proxy, tmp_path, files
) -> None:
    key = "images/exp/20260101/000000.tar"

    result = upload_through(no_conditions, tmp_path, files, key, NEW)

    assert refused_writes(proxy, "If-None-Match", files) == 1  # the fallback was taken
    assert_is_the_upload(object_store, key, result, files)


@UPLOAD_PATHS
def test_fallback_never_overwrites_an_existing_key(
    object_store, no_conditions, proxy, tmp_path, files
) -> None:
    key = "images/exp/20260101/000001.tar"
    theirs = os.urandom(4000)
    put_directly(object_store, key, theirs)

    with pytest.raises(VerificationError, match="exists already"):
        upload_through(no_conditions, tmp_path, files, key, NEW)

    assert refused_writes(proxy, "If-None-Match", files) == 1
    assert stored(object_store, key) == theirs
    assert leftovers(object_store, key) == ([key], [])  # the refused upload aborted


@UPLOAD_PATHS
def test_fallback_replaces_only_the_object_expected(
    object_store, no_conditions, proxy, tmp_path, files
) -> None:
    key = "images/exp/20260101/000002.tar"
    seen = put_directly(object_store, key, os.urandom(4000))
    theirs = os.urandom(4000)
    current = put_directly(object_store, key, theirs)  # replaced after we saw it
    assert current != seen

    with pytest.raises(VerificationError, match="no longer the object expected"):
        upload_through(no_conditions, tmp_path, files, key, {"IfMatch": seen})
    assert stored(object_store, key) == theirs
    assert leftovers(object_store, key) == ([key], [])

    result = upload_through(no_conditions, tmp_path, files, key, {"IfMatch": current})
    assert_is_the_upload(object_store, key, result, files)

    object_store.client.delete_object(Bucket=object_store.bucket, Key=key)  # gone meanwhile
    with pytest.raises(VerificationError, match="no longer the object expected"):
        upload_through(no_conditions, tmp_path, files, key, {"IfMatch": result.etag})
    assert object_store.head(key) is None
    assert leftovers(object_store, key) == ([], [])
    assert refused_writes(proxy, "If-Match", files) == 3


@UPLOAD_PATHS
def test_fallback_checks_the_key_just_before_the_write_and_sends_the_tar_once(
    no_conditions, proxy, tmp_path, files
) -> None:
    """The HEAD comes right before the write that makes the object appear, not before
    a second upload of the whole tar: a writer taking the key during a long upload is
    caught, and a store without conditional writes gets every part once."""
    calls: list[str] = []

    def record(model: Any, **_: Any) -> None:
        calls.append(model.name)

    with hooked(no_conditions.client, "before-call.s3", record):
        upload_through(no_conditions, tmp_path, files, "images/exp/20260101/000003.tar", NEW)

    assert refused_writes(proxy, "If-None-Match", files) == 1
    if files is ONE_PART:
        assert calls == ["PutObject", "HeadObject", "PutObject"]
    else:
        parts = ["UploadPart"] * 2  # 6 MiB in 5 MiB parts
        complete = "CompleteMultipartUpload"
        assert calls == [
            "CreateMultipartUpload",
            *parts,
            complete,
            "HeadObject",
            complete,
            "CopyObject",
        ]


def test_fallback_exports_and_reexports_on_a_store_without_conditional_writes(
    catalog, no_conditions, proxy, streams, data_root
) -> None:
    """The exporter end to end: a new key (If-None-Match), then a forced re-export of
    a grown tree replacing its own object (If-Match), both verified in the catalog."""
    lab = Lab(catalog, no_conditions, streams, Path(data_root.path))
    record = lab.add_exported(files=MULTIPART)
    assert record.object_key and record.status == EventStatus.VERIFIED
    (lab.source(record) / "more.tif").write_bytes(b"a superset")

    outcome = lab.exporter("forced").export(record, force=True)

    assert outcome.exported, outcome
    after = lab.get(record.ref_id)
    assert after.status == EventStatus.VERIFIED and after.etag != record.etag
    assert after.etag == no_conditions.head(record.object_key)["ETag"]
    body = object_bytes(lab, record.object_key)
    assert hashlib.sha256(body).hexdigest() == after.sha256
    assert untar(body)["./more.tif"] == b"a superset"
    assert [r.rsplit(" ", 1)[1] for r in proxy.refused] == ["If-None-Match", "If-Match"]


# --- paths ----------------------------------------------------------------------------------


def test_a_symlinked_folder_in_the_middle_of_local_path_is_refused(lab) -> None:
    record = lab.add_exported(local_path="Images/run7/stitch")
    images = lab.root / "prince" / "Images"
    elsewhere = lab.root / "prince" / "Elsewhere"
    shutil.move(images, elsewhere)
    images.symlink_to(elsewhere, target_is_directory=True)  # same files, through a link

    outcome = lab.purge()[record.ref_id]
    assert outcome.skip is not None and outcome.skip.reason == UNSAFE_SOURCE
    assert "crosses a symlink" in outcome.skip.detail
    assert (elsewhere / "run7" / "stitch").is_dir()

    forced = lab.exporter("forced").export(lab.get(record.ref_id), force=True)
    assert not forced.exported


def test_a_folder_holding_another_events_source_is_not_purged(lab) -> None:
    outer = lab.add_exported(local_path="Images/plate1")
    inner = lab.add_exported(local_path="Images/plate1/well3", age=YOUNG)

    outcomes = lab.purge()

    skip = outcomes[outer.ref_id].skip
    assert skip is not None and skip.reason == CONTAINS_OTHERS
    assert lab.source(inner).is_dir() and lab.source(outer).is_dir()


# --- the proof for users --------------------------------------------------------------------


def extract(data: bytes, into: Path) -> None:
    into.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="tar")


def test_sha256sum_checks_an_extracted_download(lab, client, tmp_path) -> None:
    files = {"a.tif": os.urandom(7000), "sub/b.tif": os.urandom(100), "empty.tif": b""}
    record = lab.add_exported(files=files)
    assert record.object_key

    manifest = client.get(f"/api/1/events/{record.ref_id}/manifest", headers=AUTH)
    assert manifest.status_code == 200, manifest.text
    body = manifest.json()
    assert body["tar"] == {
        "key": f"{lab.store.bucket}/{record.object_key}",
        "size": record.size,
        "sha256": record.sha256,
        "etag": record.etag,
    }
    assert {f["path"]: f["sha256"] for f in body["files"]} == {
        name: hashlib.sha256(data).hexdigest() for name, data in files.items()
    }
    assert body["source"] == "export" and body["purged_at"] is None

    listing = client.get(
        f"/api/1/events/{record.ref_id}/manifest", params={"format": "sha256sum"}, headers=AUTH
    )
    assert listing.status_code == 200 and listing.headers["content-type"].startswith("text/plain")
    folder = tmp_path / "download"
    extract(object_bytes(lab, record.object_key), folder)
    (tmp_path / "SHA256SUMS").write_text(listing.text)

    check = ["sha256sum", "-c", str(tmp_path / "SHA256SUMS")]
    assert subprocess.run(check, cwd=folder, capture_output=True).returncode == 0
    flipped = bytearray((folder / "a.tif").read_bytes())
    flipped[1234] ^= 0x01
    (folder / "a.tif").write_bytes(bytes(flipped))
    failed = subprocess.run(check, cwd=folder, capture_output=True, text=True)
    assert failed.returncode != 0 and "a.tif: FAILED" in failed.stdout

    assert client.get(f"/api/1/events/{record.ref_id}/manifest").status_code == 401


def test_older_exports_get_their_manifest_from_the_backfill(lab, client) -> None:
    files = {"a.tif": os.urandom(2000), "sub/b.tif": os.urandom(300)}
    records = [lab.add_exported(files=files), lab.add_exported(single_file=b"v" * 999)]
    recorded = {r.ref_id: lab.catalog.manifest(r.ref_id) for r in records}
    with lab.catalog.engine.begin() as conn:  # as exported before manifests existed
        conn.execute(MANIFESTS.delete())
        conn.execute(EVENTS.update().values(etag=None))

    missing = client.get(f"/api/1/events/{records[0].ref_id}/manifest", headers=AUTH)
    assert missing.status_code == 404 and "dlm backfill-manifests" in missing.json()["detail"]
    assert lab.purge()[records[0].ref_id].why is None  # no manifest, no purge

    report = backfill(lab.catalog, lab.store)

    assert sorted(report.recorded) == sorted(r.ref_id for r in records) and not report.failed
    for record in records:
        after = lab.catalog.manifest(record.ref_id)
        original = recorded[record.ref_id]
        assert after is not None and original is not None and after.source == "backfill"
        assert {m.path: m.sha256 for m in after.manifest().files()} == {
            m.path: m.sha256 for m in original.manifest().files()
        }
        assert lab.get(record.ref_id).etag == lab.store.head(record.object_key or "")["ETag"]
    body = client.get(f"/api/1/events/{records[0].ref_id}/manifest", headers=AUTH).json()
    assert body["source"] == "backfill" and len(body["files"]) == 2
    # whole-second mtimes from the tar still prove the unchanged tree
    outcomes = lab.purge()
    assert all(outcomes[r.ref_id].why == Why.LIFESPAN for r in records)
    assert backfill(lab.catalog, lab.store).recorded == []  # one-off: nothing left
