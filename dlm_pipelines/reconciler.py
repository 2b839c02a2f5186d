"""Reconciliation: the catalog, S3, the local disks and the tape tags agree, or a
finding says where they do not (docs/design.md, "Custody").

Everything streams, so memory stays bounded at any catalog size:

- **catalog ↔ S3**: the bucket's listing under each kind's prefix and the catalog's
  exports under it, both in key order, merged like two sorted files. HEAD only where
  the listing cannot decide (another size or ETag than recorded, or written after
  our verified upload).
- **catalog ↔ tape**: the object tag `archived=true` (docs/contracts.md §4), read
  only for exports with no archive location whose date folder the archiver has
  passed. A tagged one gets the location it must have (origin "reconciled").
- **catalog ↔ local disks**: a depth-first walk of `<data root>/<system>/` with
  sorted names (the purge's trash left out), merged with the system's local paths in
  the same order; an exported tree is compared with its recorded manifest.
- **the catalog itself**: events stuck in a state, sources gone before export.

No false alarms from work in flight: a candidate comes from the first catalog read
(the scans' snapshot) and a store observation made after it; it becomes a finding
only if a second catalog read, after that observation, still agrees, row for row
(the bracket of Rucio's consistency checks), and, for S3, a fresh HEAD confirms it.
Candidates are settled in batches while the scan goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import stat
import tarfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from dlm_pipelines.archive_locations import archive_id
from dlm_pipelines.catalog import Catalog, EventStatus, utcnow
from dlm_pipelines.events import SAFE_SEGMENT_RE, TRASH_FOLDER, EventMetadata, EventType
from dlm_pipelines.manifest import Manifest, compare, scan


class Kind(StrEnum):
    OBJECT_MISSING = "object_missing"
    OBJECT_MISMATCH = "object_mismatch"
    OBJECT_WITHOUT_EVENT = "object_without_event"
    UNANNOUNCED_FOLDER = "unannounced_folder"
    SOURCE_MISSING = "source_missing"
    CHANGED_SINCE_EXPORT = "changed_since_export"
    ARCHIVE_RECOVERED = "archive_recovered"
    NOT_ARCHIVED = "not_archived"
    STUCK = "stuck"


class Severity(StrEnum):
    ALARM = "alarm"  # data is lost or at risk: `dlm reconcile` exits 1, checks are red
    WARNING = "warning"  # needs a person, nothing lost yet
    INFO = "info"  # repaired by the reconciliation itself


SEVERITY_RANK = {Severity.ALARM: 0, Severity.WARNING: 1, Severity.INFO: 2}
# Which asset check shows a kind: per raw_export or tape_archive partition, or (no
# partition to hang it on) raw_export's whole-asset check.
EXPORT_KINDS = frozenset(
    {
        Kind.OBJECT_MISSING,
        Kind.OBJECT_MISMATCH,
        Kind.SOURCE_MISSING,
        Kind.CHANGED_SINCE_EXPORT,
        Kind.STUCK,
    }
)
TAPE_KINDS = frozenset({Kind.ARCHIVE_RECOVERED, Kind.NOT_ARCHIVED})
UNOWNED_KINDS = frozenset({Kind.OBJECT_WITHOUT_EVENT, Kind.UNANNOUNCED_FOLDER})

PREFIXES = tuple(f"{t.key_prefix}/" for t in EventType)
KIND_TO_TYPE = {t.key_prefix: t for t in EventType}
# <kind>/<experiment_id>/<YYYYMMDD>/<HHMMSS>[-<ref_id>].tar (docs/contracts.md §3)
CONTRACT_KEY_RE = re.compile(
    r"^(?P<kind>images|videos|overview)/(?P<experiment_id>[^/]+)/(?P<day>\d{8})/"
    r"\d{6}(-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?\.tar$"
)
SHA256_META = "sha256"  # the object metadata the exporter writes
REF_ID_META = "ref-id"
ARCHIVED_TAG = ("archived", "true")
IN_STORE = (EventStatus.VERIFIED, EventStatus.PURGING)  # states that promise an object
NOT_EXPORTED = (
    EventStatus.RECEIVED,
    EventStatus.EXPORTING,
    EventStatus.FAILED,
    EventStatus.NEEDS_ATTENTION,
)
STUCK_AFTER = timedelta(hours=1)  # received, exporting or failed for longer is stuck
BATCH = 1000  # candidates settled at once (one catalog re-read, HEADs in the pool)
FIRST_SHOWN = 100  # findings kept in memory for the report's table
SCANNED = ("objects", "exports", "local entries", "unexported events")


@dataclass(frozen=True)
class Finding:
    kind: Kind
    detail: str
    ref_id: str | None = None
    key: str | None = None  # the object key inside the bucket
    path: str | None = None  # <system>/<local path> under the data root
    partition_key: str | None = None

    @property
    def severity(self) -> Severity:
        return severity_of(self.kind, self.detail)

    @property
    def open_key(self) -> str:
        """The finding's identity across reports: its kind and what it is about."""
        subject = f"{self.kind}\x00{self.ref_id or ''}\x00{self.key or ''}\x00{self.path or ''}"
        return hashlib.sha256(subject.encode()).hexdigest()

    def row(self) -> dict[str, Any]:
        return {
            "open_key": self.open_key,
            "kind": self.kind.value,
            "severity": self.severity.value,
            "ref_id": self.ref_id,
            "key": self.key,
            "path": self.path,
            "partition_key": self.partition_key,
            "detail": self.detail[:4000],
        }


def severity_of(kind: Kind, detail: str) -> Severity:
    if kind in (Kind.OBJECT_MISSING, Kind.OBJECT_MISMATCH, Kind.SOURCE_MISSING):
        return Severity.ALARM
    if kind == Kind.STUCK and not detail.startswith(("received", "exporting")):
        return Severity.ALARM  # failed with no retry coming, or needs_attention
    if kind == Kind.ARCHIVE_RECOVERED:
        return Severity.INFO
    return Severity.WARNING


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    etag: str
    last_modified: datetime


@dataclass
class Report:
    report_id: int
    started_at: datetime
    ran_at: datetime | None = None
    counts: Counter[str] = field(default_factory=Counter)  # findings per kind
    severities: Counter[str] = field(default_factory=Counter)
    scanned: Counter[str] = field(default_factory=Counter)  # what was looked at
    first: list[Finding] = field(default_factory=list)  # the first FIRST_SHOWN findings
    closed: int = 0  # findings of earlier reports that are gone now
    adopted: list[str] = field(default_factory=list)  # keys recorded by --adopt

    @property
    def alarms(self) -> int:
        return self.severities[Severity.ALARM]


class FindingSink:
    """Counts findings and writes them to the catalog in batches."""

    def __init__(self, catalog: Catalog, report: Report) -> None:
        self.catalog = catalog
        self.report = report
        self.buffer: list[Finding] = []

    def add(self, finding: Finding) -> None:
        self.report.counts[finding.kind] += 1
        self.report.severities[finding.severity] += 1
        if len(self.report.first) < FIRST_SHOWN:
            self.report.first.append(finding)
        self.buffer.append(finding)
        if len(self.buffer) >= BATCH:
            self.flush()

    def flush(self) -> None:
        self.catalog.record_findings(
            self.report.report_id, [f.row() for f in self.buffer], utcnow()
        )
        self.buffer = []


def list_pages(client: Any, bucket: str, prefix: str) -> Iterator[list[ListedObject]]:
    """The bucket under `prefix`, in key order, one page (up to 1,000 keys) at a time."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        yield [
            ListedObject(
                key=item["Key"],
                size=int(item["Size"]),
                etag=str(item.get("ETag", "")).strip('"'),
                last_modified=item["LastModified"],
            )
            for item in page.get("Contents", [])
        ]


def prefetched(pages: Iterator[list[Any]], depth: int = 4) -> Iterator[Any]:
    """The items of `pages`, fetched by a thread up to `depth` pages ahead: the listing's
    round trips overlap the catalog reads and comparisons, and memory stays bounded."""
    ahead: queue.Queue[list[Any] | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: list[Any] | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for page in pages:
                if not put(page):
                    return
            put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=produce, name="reconcile-listing", daemon=True)
    thread.start()
    try:
        while True:
            got = ahead.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield from got
    finally:
        stop.set()


def _merge(
    objects: Iterator[ListedObject], rows: Iterator[Any]
) -> Iterator[tuple[ListedObject | None, Any]]:
    """Full outer join of two key-ordered streams: (object or None, row or None)."""
    obj, row = next(objects, None), next(rows, None)
    while obj is not None or row is not None:
        if row is None or (obj is not None and obj.key < row.object_key):
            yield obj, None
            obj = next(objects, None)
        elif obj is None or row.object_key < obj.key:
            yield None, row
            row = next(rows, None)
        else:
            yield obj, row
            obj, row = next(objects, None), next(rows, None)


def _same(a: Any, b: Any) -> bool:
    """The second snapshot shows the row unchanged in what the finding is about."""
    return all(
        getattr(a, name) == getattr(b, name)
        for name in ("status", "object_key", "size", "sha256", "etag", "verified_at",
                     "claimed_at", "attempts", "purged_at", "archive_path")
    )  # fmt: skip


def newest_mtime(path: Path) -> float:
    """The newest mtime in a file or tree, symlinks not followed."""
    newest = os.lstat(path).st_mtime
    if stat.S_ISDIR(os.lstat(path).st_mode):
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
                except FileNotFoundError:
                    continue
    return newest


@dataclass
class Reconciler:
    catalog: Catalog
    client: Any  # boto3 S3 client
    bucket: str
    data_root: Path
    systems: Sequence[str]
    grace: timedelta = timedelta(hours=1)
    archive_after: timedelta = timedelta(days=3)
    concurrency: int = 16
    run_id: str | None = None
    # The listing under a prefix, in pages; the bucket's own by default (the benchmark
    # feeds a generated one to measure the rest at scale).
    listing: Callable[[str], Iterator[list[ListedObject]]] | None = None

    def run(self) -> Report:
        started = utcnow()
        report = Report(self.catalog.start_report(started, self.run_id), started)
        report.scanned.update(dict.fromkeys(SCANNED, 0))  # every count shown, zeros too
        sink = FindingSink(self.catalog, report)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="reconcile") as pool:
            self._pool = pool
            self.scan_store(sink, started)
            self.scan_disks(sink, started)
            self.scan_catalog(sink, started)
        sink.flush()
        report.ran_at = utcnow()
        report.closed = self.catalog.finish_report(
            report.report_id, dict(report.counts), dict(report.scanned), report.ran_at
        )
        return report

    # --- catalog ↔ S3 and tape ------------------------------------------------------

    def _list(self, prefix: str) -> Iterator[ListedObject]:
        pages = self.listing or partial(list_pages, self.client, self.bucket)
        return prefetched(pages(prefix))

    def scan_store(self, sink: FindingSink, now: datetime) -> None:
        today = now.strftime("%Y%m%d")
        batch: list[tuple[str, ListedObject | None, Any]] = []
        scanned = sink.report.scanned
        for prefix in PREFIXES:
            pairs = _merge(self._list(prefix), self.catalog.exports_under(self.bucket, prefix))
            for listed, row in pairs:
                if listed is not None:
                    scanned["objects"] += 1
                if row is not None:
                    scanned["exports"] += 1
                candidate = self._store_candidate(listed, row, today)
                if candidate is not None:
                    batch.append((candidate, listed, row))
                    if len(batch) >= BATCH:
                        self._settle_store(batch, sink, now)
                        batch = []
        self._settle_store(batch, sink, now)

    def _store_candidate(self, listed: ListedObject | None, row: Any, today: str) -> str | None:
        """What the first look suggests: "unowned", "missing", "head", "tag" or None."""
        if row is None:
            assert listed is not None
            return "unowned" if CONTRACT_KEY_RE.match(listed.key) else None
        if row.status not in IN_STORE:
            return None  # no promise of an object yet (or a re-export in flight)
        if listed is None:
            return "missing"
        if listed.size != row.size or self._written_after(listed, row):
            return "head"  # a HEAD decides (sha256 metadata, ref-id, ETag)
        if row.etag is not None and listed.etag != row.etag.strip('"'):
            return "head"
        match = CONTRACT_KEY_RE.match(row.object_key)
        if row.archive_path is None and match is not None and match["day"] < today:
            return "tag"  # the archiver has passed its date folder
        return None

    @staticmethod
    def _written_after(listed: ListedObject, row: Any) -> bool:
        # The exporter writes the object (and its sha256 copy) before it records the
        # upload, so an object modified later was replaced. Listings give whole seconds
        # (SeaweedFS): a replacement within the upload's second is caught by the ETag
        # the export recorded (exports made before ETags were recorded have none).
        return bool(row.uploaded_at is not None and listed.last_modified > row.uploaded_at)

    def _settle_store(
        self, batch: list[tuple[str, ListedObject | None, Any]], sink: FindingSink, now: datetime
    ) -> None:
        if not batch:
            return
        unowned = [listed.key for what, listed, _ in batch if what == "unowned" and listed]
        owned = self.catalog.owned_keys(self.bucket, unowned) if unowned else set()
        fresh = self.catalog.rows_by_ref([row.ref_id for _, _, row in batch if row is not None])
        checks = []
        for what, listed, row in batch:
            if what == "unowned":
                assert listed is not None
                if listed.key not in owned:
                    sink.add(
                        Finding(
                            Kind.OBJECT_WITHOUT_EVENT,
                            f"{listed.size} bytes, modified {listed.last_modified.isoformat()}, "
                            "no event owns it (dlm reconcile --adopt records it)",
                            key=listed.key,
                        )
                    )
                continue
            again = fresh.get(row.ref_id)
            if again is None or not _same(row, again) or again.status not in IN_STORE:
                continue  # changed while we looked: work in flight, not drift
            checks.append(self._pool.submit(self._confirm, what, again, now))
        for future in checks:
            for finding in future.result():
                sink.add(finding)

    def _confirm(self, what: str, row: Any, now: datetime) -> list[Finding]:
        """The store asked again, after the second catalog read."""
        base = {"ref_id": row.ref_id, "key": row.object_key, "partition_key": row.partition_key}
        if what == "tag":
            return self._confirm_archive(row, now)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=row.object_key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
            purged = row.purged_at is not None
            detail = (
                "purged event: the local copy is deleted and the S3 object is gone"
                if purged
                else f"{row.status} event, S3 object is gone (local copy still there)"
            )
            return [Finding(Kind.OBJECT_MISSING, detail, **base)]
        meta = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
        problems = []
        if int(head["ContentLength"]) != row.size:
            problems.append(f"size {head['ContentLength']} != catalog {row.size}")
        if meta.get(SHA256_META) != row.sha256:
            problems.append(f"sha256 {meta.get(SHA256_META)!r} != catalog {row.sha256!r}")
        if meta.get(REF_ID_META) not in (None, row.ref_id):
            problems.append(f"ref-id {meta.get(REF_ID_META)!r} != {row.ref_id!r}")
        if row.etag is not None and str(head.get("ETag", "")).strip('"') != row.etag.strip('"'):
            problems.append(f"ETag {head.get('ETag')} != catalog {row.etag}")
        if problems:
            return [Finding(Kind.OBJECT_MISMATCH, "; ".join(problems), **base)]
        if what == "head":  # replaced by an identical copy: also check the tape side
            match = CONTRACT_KEY_RE.match(row.object_key)
            if row.archive_path is None and match and match["day"] < now.strftime("%Y%m%d"):
                return self._confirm_archive(row, now)
        return []

    def _confirm_archive(self, row: Any, now: datetime) -> list[Finding]:
        base = {"ref_id": row.ref_id, "key": row.object_key, "partition_key": row.partition_key}
        try:
            tags = self.client.get_object_tagging(Bucket=self.bucket, Key=row.object_key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                gone = f"{row.status} event, S3 object is gone"
                return [Finding(Kind.OBJECT_MISSING, gone, **base)]
            raise
        tagged = any((t.get("Key"), t.get("Value")) == ARCHIVED_TAG for t in tags.get("TagSet", []))
        match = CONTRACT_KEY_RE.match(row.object_key)
        assert match is not None
        if tagged:
            # docs/contracts.md §4: a tagged object is in <kind>/<experiment>/<day>.tar.
            path = f"{match['kind']}/{match['experiment_id']}/{match['day']}.tar"
            recorded = self.catalog.record_recovered_archives(
                [
                    (
                        row.ref_id,
                        f"{self.bucket}/{row.object_key}",
                        archive_id(path),
                        path,
                        KIND_TO_TYPE[match["kind"]].value,
                        match["experiment_id"],
                    )
                ],
                now,
            )
            if not recorded:
                return []  # the archiver's message arrived meanwhile
            return [
                Finding(
                    Kind.ARCHIVE_RECOVERED,
                    f"tagged archived=true with no archive message: recorded in {path}",
                    **base,
                )
            ]
        if row.verified_at is not None and now - row.verified_at > self.archive_after:
            return [
                Finding(
                    Kind.NOT_ARCHIVED,
                    f"verified {row.verified_at.isoformat()}, no archive location and no "
                    "archived=true tag",
                    **base,
                )
            ]
        return []

    # --- catalog ↔ local disks ------------------------------------------------------------

    def scan_disks(self, sink: FindingSink, now: datetime) -> None:
        for system in self.systems:
            base = self.data_root / system
            if not base.is_dir():
                continue
            walk = _Walk(system, base, _Peek(self.catalog.local_events(system)))
            self._walk(base, "", walk, now, sink)
            self._settle_disk(walk, sink)

    def _settle_disk(self, walk: _Walk, sink: FindingSink) -> None:
        """The second snapshot: an event announced meanwhile names a folder after all,
        and an event re-exported or purged meanwhile has changed nothing."""
        known = self.catalog.named_paths(walk.system, [p for p, _ in walk.unnamed])
        for path, newest in walk.unnamed:
            if path not in known:
                sink.add(
                    Finding(
                        Kind.UNANNOUNCED_FOLDER,
                        f"no event names it; newest file "
                        f"{datetime.fromtimestamp(newest, UTC).isoformat()}",
                        path=f"{walk.system}/{path}",
                    )
                )
        fresh = self.catalog.rows_by_ref([row.ref_id for row in walk.changed])
        manifests = self.catalog.manifests([row.ref_id for row in walk.changed])
        for row in walk.changed:
            again = fresh.get(row.ref_id)
            if again is None or not _same(row, again):
                continue
            detail = self._changed(again, walk.base / row.local_path, manifests.get(row.ref_id))
            if detail is not None:
                sink.add(
                    Finding(
                        Kind.CHANGED_SINCE_EXPORT,
                        detail,
                        ref_id=row.ref_id,
                        path=f"{walk.system}/{row.local_path}",
                        partition_key=row.partition_key,
                    )
                )
        walk.unnamed, walk.changed = [], []

    @staticmethod
    def _changed(row: Any, source: Path, manifest: Manifest | None) -> str | None:
        """How the local copy differs from what was exported, or None.

        The recorded manifest decides, as it does for the purge: names, types, sizes and
        mtimes. An export made before manifests were recorded (and not yet backfilled)
        falls back to the old rule: anything modified after the export began.
        """
        try:
            if manifest is not None:
                difference = compare(manifest, scan(source))
                return difference.describe() if difference else None
            newest = newest_mtime(source)
        except FileNotFoundError:
            return None  # purged or moved meanwhile: the source checks say so
        times = [t for t in (row.claimed_at, row.uploaded_at) if t is not None]
        if not times or newest <= min(times).timestamp():
            return None
        modified = datetime.fromtimestamp(newest, UTC).isoformat()
        return f"modified {modified}, after the export began {min(times).isoformat()}"

    def _walk(
        self, folder: Path, prefix: str, walk: _Walk, now: datetime, sink: FindingSink
    ) -> None:
        with os.scandir(folder) as entries:
            children = sorted(entries, key=lambda e: e.name)
        named = walk.named
        for entry in children:
            if not prefix and entry.name == TRASH_FOLDER:
                continue  # the purge's own: copies on their way out, already recorded
            path = prefix + entry.name
            order = path.replace("/", "\x01")
            sink.report.scanned["local entries"] += 1
            while named.head is not None and named.head.local_path.replace("/", "\x01") < order:
                named.advance()  # events whose path is not here (source checks elsewhere)
            head = named.head
            if head is not None and head.local_path == path:
                # An event's folder or file: its contents are its own.
                while named.head is not None and (
                    named.head.local_path == path or named.head.local_path.startswith(path + "/")
                ):
                    row = named.head
                    exported = row.status in IN_STORE and not row.purged_at
                    if row.local_path == path and exported:
                        walk.changed.append(row)  # compared with its manifest in a batch
                    named.advance()
            elif head is not None and head.local_path.startswith(path + "/"):
                if entry.is_dir(follow_symlinks=False):
                    self._walk(Path(entry.path), path + "/", walk, now, sink)
            else:
                newest = newest_mtime(Path(entry.path))
                if now.timestamp() - newest > self.grace.total_seconds():
                    walk.unnamed.append((path, newest))
            if len(walk.unnamed) + len(walk.changed) >= BATCH:
                self._settle_disk(walk, sink)

    # --- the catalog itself --------------------------------------------------------------

    def scan_catalog(self, sink: FindingSink, now: datetime) -> None:
        batch: list[tuple[Any, Finding]] = []
        for row in self.catalog.in_states([s.value for s in NOT_EXPORTED]):
            sink.report.scanned["unexported events"] += 1
            batch += [(row, f) for f in self._catalog_findings(row, now)]
            if len(batch) >= BATCH:
                self._settle_catalog(batch, sink, now)
                batch = []
        self._settle_catalog(batch, sink, now)

    def _catalog_findings(self, row: Any, now: datetime) -> list[Finding]:
        base = {"ref_id": row.ref_id, "partition_key": row.partition_key}
        found = []
        since = row.received_at if row.status == EventStatus.RECEIVED else row.claimed_at
        if row.status == EventStatus.FAILED and row.next_attempt_at is not None:
            since = row.next_attempt_at  # a retry is scheduled: stuck only once it is overdue
        if row.status == EventStatus.NEEDS_ATTENTION:
            found.append(Finding(Kind.STUCK, "needs_attention: the store does not match the "
                                 "catalog; re-export the partition", **base))  # fmt: skip
        elif since is not None and now - since > STUCK_AFTER:
            why = {
                EventStatus.RECEIVED: "never tried: no run took it",
                EventStatus.EXPORTING: "claimed by a run that never finished it",
                EventStatus.FAILED: "last attempt failed, no retry scheduled",
            }[EventStatus(row.status)]
            found.append(
                Finding(
                    Kind.STUCK,
                    f"{row.status} since {since.isoformat()}: {why}",
                    **base,
                )
            )
        if row.purged_at is None and not self._source_exists(row):
            path = f"{row.system}/{row.local_path}"
            found.append(
                Finding(
                    Kind.SOURCE_MISSING,
                    f"{row.status} event, its source is gone: it can never be exported",
                    path=path,
                    **base,
                )
            )
        return found

    def _source_exists(self, row: Any) -> bool:
        return os.path.lexists(self.data_root / row.system / row.local_path)

    def _settle_catalog(
        self, batch: list[tuple[Any, Finding]], sink: FindingSink, now: datetime
    ) -> None:
        fresh = self.catalog.rows_by_ref({row.ref_id for row, _ in batch})
        for row, finding in batch:
            again = fresh.get(row.ref_id)
            if again is None or not _same(row, again):
                continue
            if finding.kind == Kind.SOURCE_MISSING and self._source_exists(again):
                continue
            sink.add(finding)


class _Peek:
    """An iterator with a look at its next item."""

    def __init__(self, items: Iterator[Any]) -> None:
        self._items = items
        self.head: Any = next(items, None)

    def advance(self) -> None:
        self.head = next(self._items, None)


@dataclass
class _Walk:
    """One system's disk walk: the events in walk order and what it found."""

    system: str
    base: Path
    named: _Peek
    unnamed: list[tuple[str, float]] = field(default_factory=list)  # (path, newest mtime)
    changed: list[Any] = field(default_factory=list)  # rows whose copy changed, to settle


# --- adoption of objects no event owns (legacy exports) ---------------------------------

TAIL_BYTES = 1 << 20  # metadata.json is the last member: read the object's tail only


class AdoptError(ValueError):
    """The object cannot be recorded; the text says why."""


def read_tar_metadata(client: Any, bucket: str, key: str, size: int) -> dict[str, Any]:
    """`./metadata.json` of a tar in S3 (docs/contracts.md §3), from its last MiB."""
    start = max(0, size - TAIL_BYTES)
    tail = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{size - 1}")[
        "Body"
    ].read()
    # Headers sit at 512-byte offsets from the start of the tar; search from the end.
    first = (-start) % 512
    for offset in range(first + ((len(tail) - first) // 512 - 1) * 512, first - 1, -512):
        block = tail[offset : offset + 512]
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            continue
        if info.name.lstrip("./") == "metadata.json" and info.isfile():
            data = tail[offset + 512 : offset + 512 + info.size]
            if len(data) == info.size:
                document = json.loads(data)
                if isinstance(document, dict):
                    return document
    raise AdoptError("no metadata.json in the tar's last MiB")


def adoption_row(
    key: str, bucket: str, head: dict[str, Any], sha256: str, document: dict[str, Any],
    systems: Sequence[str], now: datetime,
) -> dict[str, Any]:  # fmt: skip
    """The catalog row of a legacy export, from its metadata.json and the object."""
    from dlm_pipelines.events import UUID_RE

    try:
        ref_id = document["ref_id"]
        experiment_id = document["experiment_id"]
        timestamp = datetime.fromisoformat(document["timestamp"])
        event_type = EventType(document.get("type", "stitch"))
        system = document.get("system", "prince")
        metadata = EventMetadata.model_validate(document["metadata"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AdoptError(f"metadata.json does not describe an event: {exc}") from None
    if not isinstance(ref_id, str) or not UUID_RE.match(ref_id):
        raise AdoptError(f"metadata.json: ref_id {ref_id!r} is not a UUID")
    if not isinstance(experiment_id, str) or not SAFE_SEGMENT_RE.match(experiment_id):
        raise AdoptError(f"metadata.json: experiment_id {experiment_id!r} is not safe")
    if timestamp.tzinfo is None:
        raise AdoptError("metadata.json: timestamp has no timezone")
    if system not in systems:
        raise AdoptError(f"metadata.json: system {system!r} is not in DLM_SYSTEMS")
    day = timestamp.astimezone(UTC).date().isoformat()
    return {
        "ref_id": ref_id,
        "stream_id": "adopted",  # never announced on the stream: found in S3
        "system": system,
        "experiment_id": experiment_id,
        "event_type": event_type.value,
        "timestamp": timestamp,
        "partition_key": f"{day}|{system}",
        "local_path": f"adopted/{ref_id}",  # unknown: the legacy system did not say
        "img_count": 0,
        "metadata": metadata.model_dump(mode="json"),
        "received_at": now,
        "status": EventStatus.VERIFIED.value,
        "bucket": bucket,
        "object_key": key,
        "key_collision": False,
        "size": int(head["ContentLength"]),
        "sha256": sha256,
        "uploaded_at": head["LastModified"],
        "verified_at": now,
        # No local copy is ours to purge: it counts as purged, so the purge never looks.
        "purged_at": now,
        "attempts": 0,
    }


def adopt(
    catalog: Catalog, client: Any, bucket: str, keys: Iterable[str], systems: Sequence[str]
) -> dict[str, str]:
    """Record each object (a legacy export) from its tar's metadata.json; the sha256 is
    computed by reading the object once. Returns key → "adopted" or the reason not."""
    outcome: dict[str, str] = {}
    for key in keys:
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            size = int(head["ContentLength"])
            document = read_tar_metadata(client, bucket, key, size)
            digest = hashlib.sha256()
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(1 << 20):
                digest.update(chunk)
            row = adoption_row(key, bucket, head, digest.hexdigest(), document, systems, utcnow())
        except (AdoptError, ClientError, json.JSONDecodeError) as exc:
            outcome[key] = f"not adopted: {exc}"
            continue
        if catalog.adopt_export(row):
            outcome[key] = "adopted"
        else:
            outcome[key] = f"not adopted: ref_id {row['ref_id']} or the key is catalogued already"
    return outcome


def render(report: Report, findings: Iterable[Any] = ()) -> str:
    """The report as text (dlm reconcile)."""
    lines = [
        f"reconciliation {report.report_id} ran at "
        f"{(report.ran_at or report.started_at).isoformat()}",
        "scanned: " + ", ".join(f"{n} {what}" for what, n in sorted(report.scanned.items())),
        f"findings: {sum(report.counts.values())} ({report.alarms} alarm(s)); "
        f"{report.closed} earlier finding(s) closed",
    ]
    lines += [f"  {kind:22} {n}" for kind, n in sorted(report.counts.items())]
    for f in findings:
        where = f.key or f.path or ""
        lines.append(f"{f.severity:8} {f.kind:22} {f.ref_id or '-':36} {where}  {f.detail}")
    return "\n".join(lines)
