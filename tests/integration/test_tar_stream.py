"""The streaming tar upload against a real SeaweedFS: exact bytes, and nothing left on failure."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from dlm_pipelines.tar_stream import upload_tar, write_tar
from tests.integration.helpers import hooked

pytestmark = pytest.mark.integration

MIB = 1 << 20
PART = 5 * MIB  # the smallest part S3 allows: several parts from a few MiB


def leftovers(store, key: str) -> tuple[list[str], list[str]]:
    """Objects in the bucket, and multipart uploads still open for `key`."""
    objects = store.client.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=key)
    return [o["Key"] for o in objects], [u["UploadId"] for u in uploads.get("Uploads", [])]


def test_uploaded_bytes_are_the_tar_with_its_sha256(object_store, tmp_path: Path) -> None:
    source = tmp_path / "acq"
    (source / "sub").mkdir(parents=True)
    (source / "big.tif").write_bytes(os.urandom(11 * MIB + 123))  # spans three parts
    (source / "block.tif").write_bytes(os.urandom(4096))  # a whole number of tar blocks
    (source / "empty.tif").write_bytes(b"")
    (source / "sub" / "a.tif").write_bytes(b"A" * 10)
    os.link(source / "sub" / "a.tif", source / "sub" / "hardlink.tif")
    (source / "link").symlink_to("sub/a.tif")
    metadata = {"ref_id": "r1", "timestamp": "2026-01-01T00:00:00+00:00", "schema_version": "1a1"}

    result = upload_tar(
        object_store.client,
        source=source,
        metadata=metadata,
        bucket=object_store.bucket,
        key="images/exp/20260101/000000.tar",
        object_metadata={"ref-id": "r1"},
        part_size=PART,
        part_concurrency=2,
    )

    body = object_store.client.get_object(
        Bucket=object_store.bucket, Key="images/exp/20260101/000000.tar"
    )["Body"].read()
    assert result.size == len(body) and result.sha256 == hashlib.sha256(body).hexdigest()
    # byte for byte what plain `write_tar` gives (deterministic: metadata.json included)
    expected = io.BytesIO()
    write_tar(source, metadata, expected)
    assert body == expected.getvalue()
    assert result.etag == object_store.head("images/exp/20260101/000000.tar")["ETag"]
    # the manifest: every member with its own sha256, read in the same pass
    files = {m.path: m for m in result.manifest.files()}
    assert set(files) == {"big.tif", "block.tif", "empty.tif", "sub/a.tif", "sub/hardlink.tif"}
    for path, member in files.items():
        assert member.sha256 == hashlib.sha256((source / path).read_bytes()).hexdigest()
        assert member.mtime_ns == os.lstat(source / path).st_mtime_ns
        assert member.size == os.lstat(source / path).st_size
    link = next(m for m in result.manifest.members if m.path == "link")
    assert (link.type, link.target) == ("symlink", "sub/a.tif")


def test_a_file_shrinking_midway_leaves_no_object_and_no_open_upload(
    object_store, tmp_path: Path
) -> None:
    source = tmp_path / "acq"
    source.mkdir()
    growing = source / "frame.tif"
    growing.write_bytes(os.urandom(4 * PART))
    key = "images/exp/20260101/000001.tar"

    def truncate_after_first_part(_: int) -> None:
        # One part in flight and one buffer ahead: the tar has read 2 of 4 parts.
        # The file now ends before the size its header announced.
        os.truncate(growing, PART + 100)

    with pytest.raises(OSError, match="unexpected end of data"):
        upload_tar(
            object_store.client,
            source=source,
            metadata={"ref_id": "r2", "timestamp": "2026-01-01T00:00:01+00:00"},
            bucket=object_store.bucket,
            key=key,
            object_metadata={},
            part_size=PART,
            part_concurrency=1,
            on_progress=truncate_after_first_part,
        )

    assert object_store.head(key) is None
    assert leftovers(object_store, key) == ([], [])


def client_with_hook(object_store, hook) -> object:
    """A client of its own (the store's is shared) with `hook` before each part is sent."""
    client = boto3.client(
        "s3", endpoint_url=object_store.endpoint_url, region_name=object_store.region_name
    )
    client.meta.events.register("before-send.s3.UploadPart", hook)
    return client


def upload_one_frame(client, object_store, tmp_path: Path, key: str, parts: int) -> None:
    source = tmp_path / "acq"
    source.mkdir()
    (source / "frame.tif").write_bytes(os.urandom(parts * PART))
    upload_tar(
        client,
        source=source,
        metadata={"ref_id": key, "timestamp": "2026-01-01T00:00:02+00:00"},
        bucket=object_store.bucket,
        key=key,
        object_metadata={},
        part_size=PART,
        part_concurrency=2,
    )


def is_part_2(request) -> bool:
    return "partNumber=2&" in request.url + "&"


def test_a_part_failing_midway_leaves_no_object_and_no_open_upload(
    object_store, tmp_path: Path
) -> None:
    key = "images/exp/20260101/000002.tar"

    def link_down_on_part_2(request, **_) -> None:
        if is_part_2(request):
            raise LinkDown("connection lost while sending part 2")

    client = client_with_hook(object_store, link_down_on_part_2)
    with pytest.raises(LinkDown):
        upload_one_frame(client, object_store, tmp_path, key, parts=4)

    assert object_store.head(key) is None
    assert leftovers(object_store, key) == ([], [])


def test_a_part_corrupted_on_its_way_is_refused_and_leaves_nothing(
    object_store, tmp_path: Path
) -> None:
    key = "images/exp/20260101/000003.tar"

    def flip_a_byte_of_part_2(request, **_) -> None:
        # After botocore computed the part's CRC32 (and payload hash): bytes changed in
        # transit. The store must refuse the part rather than keep other bytes.
        if is_part_2(request):
            body = bytearray(request.body)
            body[len(body) // 2] ^= 0xFF
            request.body = bytes(body)

    client = client_with_hook(object_store, flip_a_byte_of_part_2)
    with pytest.raises(ClientError) as refused:
        upload_one_frame(client, object_store, tmp_path, key, parts=3)

    print(f"the store's answer: {refused.value}")
    assert object_store.head(key) is None
    assert leftovers(object_store, key) == ([], [])


class LinkDown(RuntimeError):
    pass


def test_a_one_part_tar_goes_up_as_one_put_with_its_sha256(object_store, tmp_path: Path) -> None:
    """The small-event path: one PutObject carrying the sha256 (metadata and checksum),
    no multipart upload and no metadata copy; the object is what verification expects."""
    source = tmp_path / "acq"
    source.mkdir()
    (source / "frame.tif").write_bytes(os.urandom(1000))
    key = "images/exp/20260101/000004.tar"
    calls: list[str] = []
    requests: list[dict] = []

    def record(model, params, **_) -> None:
        calls.append(model.name)
        requests.append(params)

    with hooked(object_store.client, "before-call.s3", record):
        result = object_store.upload_tar(
            source=source,
            metadata={"ref_id": "r4", "timestamp": "2026-01-01T00:00:04+00:00"},
            key=key,
            ref_id="r4",
        )

    assert calls == ["PutObject"] and result.sha256_in_metadata
    assert requests[0]["headers"]["x-amz-checksum-sha256"]
    body = object_store.client.get_object(Bucket=object_store.bucket, Key=key)["Body"].read()
    assert (result.size, result.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    object_store.verify_object(key, size=result.size, sha256=result.sha256, ref_id="r4")
    assert object_store.head(key)["ContentType"] == "application/x-tar"
    assert leftovers(object_store, key) == ([key], [])


def test_a_one_part_tar_corrupted_on_its_way_is_refused(object_store, tmp_path: Path) -> None:
    key = "images/exp/20260101/000005.tar"

    def flip_a_byte(request, **_) -> None:
        sent = request.body
        body = bytearray(sent.read() if hasattr(sent, "read") else sent)
        body[len(body) // 2] ^= 0xFF
        request.body = bytes(body)

    def corrupting_client(checksums: str) -> Any:
        client = boto3.client(
            "s3",
            endpoint_url=object_store.endpoint_url,
            region_name=object_store.region_name,
            # no payload hash in the signature: only a checksum can catch the change
            config=Config(
                s3={"payload_signing_enabled": False}, request_checksum_calculation=checksums
            ),
        )
        client.meta.events.register("before-send.s3.PutObject", flip_a_byte)
        return client

    # the control: without a checksum, the store keeps the corrupted bytes
    control = corrupting_client("when_required")
    control.put_object(Bucket=object_store.bucket, Key=key + ".control", Body=b"x" * 1000)
    assert object_store.head(key + ".control") is not None
    object_store.client.delete_object(Bucket=object_store.bucket, Key=key + ".control")

    client = corrupting_client("when_required")  # no CRC32 either: only our sha256
    source = tmp_path / "acq"
    source.mkdir()
    (source / "frame.tif").write_bytes(os.urandom(1000))
    with pytest.raises(ClientError) as refused:
        upload_tar(
            client,
            source=source,
            metadata={"ref_id": "r5", "timestamp": "2026-01-01T00:00:05+00:00"},
            bucket=object_store.bucket,
            key=key,
            object_metadata={"ref-id": "r5"},
            part_size=PART,
            part_concurrency=1,
            sha256_metadata_key="sha256",
        )
    print(f"the store's answer: {refused.value}")
    assert object_store.head(key) is None
    assert leftovers(object_store, key) == ([], [])
