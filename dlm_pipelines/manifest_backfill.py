"""`dlm backfill-manifests`: give events exported before manifests existed their
manifest, read back from the stored tar (no local data needed; one-off).

Each object is streamed once: its sha256 must equal the catalog's before anything is
recorded, so the manifest describes exactly the tar the catalog vouches for.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, field
from typing import Any

from dlm_pipelines.catalog import Catalog, migrate
from dlm_pipelines.manifest import Manifest, from_tar
from dlm_pipelines.resources import ObjectStore

BATCH = 100


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.raw.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class BackfillReport:
    recorded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def read_manifest(store: ObjectStore, key: str) -> tuple[Manifest, str, str]:
    """The manifest of the tar at `key`, its sha256 and its ETag."""
    response = store.client.get_object(Bucket=store.bucket, Key=key)
    body = _Hashing(response["Body"])
    manifest = from_tar(body)  # type: ignore[arg-type]
    body.drain()  # the tar's end-of-archive blocks count too
    return manifest, body.digest.hexdigest(), str(response["ETag"])


def backfill(catalog: Catalog, store: ObjectStore) -> BackfillReport:
    report = BackfillReport()
    while True:
        pending = [
            r
            for r in catalog.without_manifest(BATCH + len(report.failed))
            if r.ref_id not in report.failed
        ]
        if not pending:
            return report
        for record in pending:
            assert record.object_key
            try:
                if record.bucket != store.bucket:
                    raise ValueError(f"exported to bucket {record.bucket}, not {store.bucket}")
                manifest, sha256, etag = read_manifest(store, record.object_key)
                if sha256 != record.sha256:
                    raise ValueError(f"the object's sha256 {sha256} != catalog {record.sha256}")
                if not catalog.record_backfilled_manifest(
                    record.ref_id, tar_sha256=sha256, etag=etag, manifest=manifest
                ):
                    raise ValueError("the catalog changed meanwhile (re-exported?)")
                report.recorded.append(record.ref_id)
            except Exception as exc:  # one event's problem never stops the others
                report.failed[record.ref_id] = f"{type(exc).__name__}: {exc}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Record the manifest of every verified export that has none (exported before "
        "manifests), read from its tar in the object store. Safe to run again."
    )


def run(_: argparse.Namespace) -> int:
    from dlm_pipelines.settings import get_settings

    settings = get_settings()
    migrate(settings.database_url)
    catalog = Catalog(database_url=settings.database_url)
    store = ObjectStore(
        bucket=settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.aws_region,
    )
    report = backfill(catalog, store)
    for ref_id, why in report.failed.items():
        print(f"{ref_id}: not recorded: {why}")
    print(f"recorded {len(report.recorded)} manifest(s), {len(report.failed)} failed")
    return 1 if report.failed else 0
