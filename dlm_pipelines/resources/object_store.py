"""The S3-compatible object store (SeaweedFS in development, any S3 API in production).

Built on dagster-aws's `ResourceWithS3Configuration`, so the Dagster UI shows the
familiar S3 fields (`endpoint_url`, `region_name`, `max_attempts`, ...). Credentials
come from boto3's standard chain (`AWS_ACCESS_KEY_ID`, ...), never from resource
config. The client is our own: path-style addressing (SeaweedFS, MinIO), a pool large
enough for parallel part uploads, and timeouts, none of which dagster-aws's
`construct_s3_client` sets.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from dagster_aws.s3.resources import ResourceWithS3Configuration

from dlm_pipelines.tar_stream import UploadResult, upload_tar

ARCHIVED_TAG = "archived"  # set to "true" by the tape archiver once the object is on tape
SHA256_META = "sha256"
REF_ID_META = "ref-id"
COPY_LIMIT = 5 * 1024**3  # CopyObject's limit; larger objects need a multipart copy


class VerificationError(RuntimeError):
    """The stored object does not match what was uploaded or what the catalog says."""


class KeyTaken(VerificationError):
    """A conditional write was refused: the key is not (or no longer) what the
    writer expected. Nothing was written."""


# What stores answer to a refused If-None-Match / If-Match.
REFUSED_CONDITION_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict")


MAX_POOL_CONNECTIONS = 64  # parts in flight across the events a run exports at once


@cache
def _client(endpoint_url: str | None, region: str | None, max_attempts: int) -> Any:
    """One client (and connection pool) per process and configuration."""
    config = Config(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


class ObjectStore(ResourceWithS3Configuration):
    bucket: str
    region_name: str | None = "us-east-1"
    max_attempts: int = 6  # the first try and five retries
    part_size_mib: int = 16
    part_concurrency: int = 4

    @property
    def client(self) -> Any:
        return _client(self.endpoint_url, self.region_name, self.max_attempts)

    def head(self, key: str) -> dict[str, Any] | None:
        """HEAD the object; None if there is none."""
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def abort_incomplete_uploads(self, key: str) -> int:
        """Abort multipart uploads left for `key` by a killed exporter."""
        response = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        aborted = 0
        for upload in response.get("Uploads", []):
            if upload["Key"] == key:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload["UploadId"]
                )
                aborted += 1
        return aborted

    def upload_tar(
        self,
        *,
        source: Path,
        metadata: dict[str, Any],
        key: str,
        ref_id: str,
        condition: dict[str, str] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> UploadResult:
        """Stream the tar of `source` to `key`, then record its sha256 on the object.
        `on_progress` gets the size of each part once S3 has it.

        `condition` (`{"IfNoneMatch": "*"}` for a free key, `{"IfMatch": etag}` to
        replace exactly that object) makes the write conditional; where the store
        answers NotImplemented, a HEAD checks the same just before the write is made
        unconditionally (after the last part: the window is one round trip, not the
        whole upload, and nothing is sent twice).
        """
        arguments: dict[str, Any] = {
            "source": source,
            "metadata": metadata,
            "bucket": self.bucket,
            "key": key,
            "object_metadata": {REF_ID_META: ref_id},
            "part_size": self.part_size_mib << 20,
            "part_concurrency": self.part_concurrency,
            "on_progress": on_progress,
            "sha256_metadata_key": SHA256_META,
            "condition": condition,
            "fallback_check": partial(self._check_by_head, key, condition) if condition else None,
        }
        try:
            result = upload_tar(self.client, **arguments)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in REFUSED_CONDITION_CODES:
                raise KeyTaken(f"s3://{self.bucket}/{key}: {exc}") from exc
            raise
        if result.sha256_in_metadata:  # a one-part tar: put whole, with its sha256
            return result
        # The sha256 is known only once the last byte is sent: add it to the object's
        # metadata with an in-place copy (metadata only on SeaweedFS and AWS), only of
        # the object this upload made (a writer in between fails the copy).
        new_metadata = {REF_ID_META: ref_id, SHA256_META: result.sha256}
        if result.size <= COPY_LIMIT:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                CopySourceIfMatch=result.etag,
                Metadata=new_metadata,
                MetadataDirective="REPLACE",
                ContentType="application/x-tar",
            )
        else:
            self.client.copy(
                {"Bucket": self.bucket, "Key": key},
                self.bucket,
                key,
                ExtraArgs={
                    "Metadata": new_metadata,
                    "MetadataDirective": "REPLACE",
                    "CopySourceIfMatch": result.etag,
                },
            )
        return result

    def _check_by_head(self, key: str, condition: dict[str, str]) -> None:
        head = self.head(key)
        if "IfNoneMatch" in condition and head is not None:
            raise KeyTaken(f"s3://{self.bucket}/{key} exists already")
        if "IfMatch" in condition and (head is None or head["ETag"] != condition["IfMatch"]):
            raise KeyTaken(f"s3://{self.bucket}/{key} is no longer the object expected")

    def verify_object(
        self,
        key: str,
        *,
        size: int,
        sha256: str,
        ref_id: str | None = None,
        etag: str | None = None,
    ) -> str:
        """A fresh HEAD must show exactly this size and sha256 (and ref_id and the store's
        ETag, if given); returns the ETag. Our sha256 metadata alone proves nothing: it
        can be copied onto other bytes; the ETag is the store's own."""
        head = self.head(key)
        where = f"s3://{self.bucket}/{key}"
        if head is None:
            raise VerificationError(f"{where} does not exist")
        meta = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
        problems: list[str] = []
        if head["ContentLength"] != size:
            problems.append(f"size {head['ContentLength']} != expected {size}")
        if meta.get(SHA256_META) != sha256:
            problems.append(f"sha256 {meta.get(SHA256_META)!r} != expected {sha256!r}")
        if ref_id is not None and self.ref_id_of(head) != ref_id:
            problems.append(f"ref-id {self.ref_id_of(head)!r} != expected {ref_id!r}")
        if etag is not None and head["ETag"] != etag:
            problems.append(f"ETag {head['ETag']} != recorded {etag}")
        if problems:
            raise VerificationError(f"{where}: " + "; ".join(problems))
        return str(head["ETag"])

    def is_archived(self, key: str) -> bool:
        """Whether the tape archiver tagged the object `archived=true`."""
        try:
            tags = self.client.get_object_tagging(Bucket=self.bucket, Key=key)["TagSet"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return any(t["Key"] == ARCHIVED_TAG and t["Value"].lower() == "true" for t in tags)

    @staticmethod
    def ref_id_of(head: dict[str, Any]) -> str | None:
        """The ref-id recorded in an object's metadata (None for foreign objects)."""
        return {k.lower(): v for k, v in head.get("Metadata", {}).items()}.get(REF_ID_META)

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (development stacks)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)
