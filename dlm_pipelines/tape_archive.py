"""Archive notifications from the tape archiver (CONTRACTS §4): parse, then record.

`parse_archive_message` turns a message body into an `ArchiveMessage`, or raises
`InvalidArchiveMessage` whose text says exactly what is wrong. `record_archive_messages`
writes whole messages to the catalog in one transaction; it is idempotent, so a
redelivered message changes nothing (and fills in members whose export has appeared
since).
"""

from __future__ import annotations

import json
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from dlm_pipelines.catalog import (
    Archive,
    ArchiveJob,
    ArchiveMember,
    Catalog,
    EventRecord,
    utcnow,
)
from dlm_pipelines.events import SAFE_SEGMENT_RE, EventType

# Fixed forever: archive ids derived from it are stored and served by the API.
ARCHIVE_ID_NAMESPACE = uuid.UUID("5d0f3c2e-8a51-4c1e-9a47-2f6b1d7e3c90")
EVENT_TYPE_BY_KIND = {t.key_prefix: t.value for t in EventType}  # images → stitch, ...
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
NAIVE_DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?$")
PATH_RE = re.compile(r"^(?P<kind>[^/]+)/(?P<experiment_id>[^/]+)/(?P<day>\d{8})\.tar$")
MAX_JOB_ID = 64  # the catalog's column sizes
MAX_KEY = 1024
QUERY_CHUNK = 1000  # keys per IN (...) lookup or rows per INSERT


class InvalidArchiveMessage(ValueError):
    """A message that breaks CONTRACTS §4; the text is the reason."""


def archive_id(path: str) -> str:
    """The archive's id: the same path gives the same id on every delivery."""
    return str(uuid.uuid5(ARCHIVE_ID_NAMESPACE, path))


@dataclass(frozen=True)
class ArchiveFile:
    path: str
    src_keys: tuple[str, ...]  # bucket-prefixed, duplicates removed, in message order
    event_type: str
    experiment_id: str

    @property
    def id(self) -> str:
        return archive_id(self.path)


@dataclass(frozen=True)
class ArchiveMessage:
    job_id: str
    date: date
    archives: tuple[ArchiveFile, ...]
    document: dict[str, Any]  # the body as sent, kept in archive_job.message


# --- parsing -----------------------------------------------------------------------------


def parse_archive_message(body: bytes | str) -> ArchiveMessage:
    """Validate one message body against CONTRACTS §4."""
    try:
        # Decoded here: json.loads would guess UTF-16/32 from the bytes.
        document = json.loads(body.decode("utf-8") if isinstance(body, bytes) else body)
    except UnicodeDecodeError as exc:
        raise InvalidArchiveMessage(f"body is not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise InvalidArchiveMessage(
            f"body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(document, dict):
        raise InvalidArchiveMessage(f"body must be a JSON object, got {_kind(document)}")
    missing = [name for name in ("job_id", "date", "archives") if name not in document]
    if missing:
        raise InvalidArchiveMessage(f"missing field(s): {', '.join(missing)}")

    job_id = document["job_id"]
    if not isinstance(job_id, str) or not job_id.strip() or len(job_id) > MAX_JOB_ID:
        raise InvalidArchiveMessage(
            f"job_id: {job_id!r} is not a non-empty string of at most {MAX_JOB_ID} characters"
        )

    archives = document["archives"]
    if not isinstance(archives, list):
        raise InvalidArchiveMessage(f"archives: must be a list, got {_kind(archives)}")
    files = tuple(_parse_archive(item, f"archives[{i}]") for i, item in enumerate(archives))
    seen: dict[str, int] = {}
    for i, archive in enumerate(files):
        if archive.path in seen:
            raise InvalidArchiveMessage(
                f"archives[{i}].path: {archive.path!r} repeats archives[{seen[archive.path]}]"
            )
        seen[archive.path] = i

    return ArchiveMessage(
        job_id=job_id, date=parse_run_date(document["date"]), archives=files, document=document
    )


def parse_run_date(value: object) -> date:
    """`2026-12-01`, or the naive `2026-11-27T00:00:00` of older archivers."""
    if isinstance(value, str):
        try:
            if DATE_RE.match(value):
                return date.fromisoformat(value)
            if NAIVE_DATETIME_RE.match(value):
                return datetime.fromisoformat(value).date()
        except ValueError as exc:
            raise InvalidArchiveMessage(f"date: {value!r} is not a real date ({exc})") from None
    raise InvalidArchiveMessage(
        f"date: {value!r} is neither YYYY-MM-DD nor a naive YYYY-MM-DDTHH:MM:SS"
    )


def _parse_archive(item: object, where: str) -> ArchiveFile:
    if not isinstance(item, dict):
        raise InvalidArchiveMessage(f"{where}: must be an object, got {_kind(item)}")
    missing = [name for name in ("path", "src_keys") if name not in item]
    if missing:
        raise InvalidArchiveMessage(f"{where}: missing field(s): {', '.join(missing)}")

    path = item["path"]
    match = PATH_RE.match(path) if isinstance(path, str) and len(path) <= MAX_KEY else None
    if match is None:
        raise InvalidArchiveMessage(
            f"{where}.path: {path!r} is not <kind>/<experiment_id>/<YYYYMMDD>.tar"
        )
    kind, experiment_id, day = match["kind"], match["experiment_id"], match["day"]
    if kind not in EVENT_TYPE_BY_KIND:
        raise InvalidArchiveMessage(
            f"{where}.path: kind {kind!r} is not one of {', '.join(EVENT_TYPE_BY_KIND)}"
        )
    if not SAFE_SEGMENT_RE.match(experiment_id):
        raise InvalidArchiveMessage(
            f"{where}.path: experiment_id {experiment_id!r} is not a safe single path segment"
        )
    try:
        datetime.strptime(day, "%Y%m%d")
    except ValueError:
        raise InvalidArchiveMessage(f"{where}.path: {day!r} is not a real YYYYMMDD day") from None

    src_keys = item["src_keys"]
    if not isinstance(src_keys, list):
        raise InvalidArchiveMessage(f"{where}.src_keys: must be a list, got {_kind(src_keys)}")
    for i, key in enumerate(src_keys):
        if not isinstance(key, str) or not key or len(key) > MAX_KEY:
            raise InvalidArchiveMessage(
                f"{where}.src_keys[{i}]: {key!r} is not a non-empty key of at most "
                f"{MAX_KEY} characters"
            )
    return ArchiveFile(
        path=path,
        src_keys=tuple(dict.fromkeys(src_keys)),
        event_type=EVENT_TYPE_BY_KIND[kind],
        experiment_id=experiment_id,
    )


def _kind(value: object) -> str:
    names: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), repr(value))


# --- recording ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedArchive:
    path: str
    id: str
    member_count: int
    by_partition: dict[str, list[str]]  # partition key → ref_ids of matched exports
    unmatched_keys: list[str]


@dataclass(frozen=True)
class RecordedJob:
    job_id: str
    date: date
    first_delivery: bool  # False: the job was already in the catalog (a redelivery)
    archives: list[RecordedArchive] = field(default_factory=list)

    @property
    def unmatched_keys(self) -> list[str]:
        return [key for archive in self.archives for key in archive.unmatched_keys]


def record_archive_messages(
    catalog: Catalog, messages: Sequence[ArchiveMessage], received_at: datetime | None = None
) -> list[RecordedJob]:
    """Write the messages' jobs, archives and members; mark matched exports archived.

    All in one transaction, so no message is ever half in the catalog, and the caller
    acks only after it committed. Idempotent: recording a message again changes
    nothing, except that members unmatched before are matched if their export exists.
    A handful of statements per batch, not per message: sensor throughput depends on it.
    """
    if not messages:
        return []
    now = received_at or utcnow()
    insert = postgresql.insert if catalog.engine.dialect.name == "postgresql" else sqlite.insert
    files: dict[str, tuple[ArchiveFile, str]] = {}  # id → (archive, job_id); first wins
    for message in messages:
        for archive in message.archives:
            files.setdefault(archive.id, (archive, message.job_id))
    # An archive file named twice (the same message redelivered, or a re-run) has the
    # union of their keys as members.
    keys = {(a.id, a.path, key): None for m in messages for a in m.archives for key in a.src_keys}
    with catalog.engine.begin() as conn:
        new_jobs = _insert_jobs(conn, insert, messages, now)
        owners = _export_owners(conn, {key for _, _, key in keys})
        archive_rows = [
            {
                "id": archive.id,
                "path": archive.path,
                "event_type": archive.event_type,
                "experiment_id": archive.experiment_id,
                "created_at": now,
                "job_id": job_id,
            }
            for archive, job_id in files.values()
        ]
        # An archive that exists already (another job wrote the same file) keeps its row.
        for rows in _chunks(archive_rows):
            conn.execute(insert(ARCHIVE).values(rows).on_conflict_do_nothing(index_elements=["id"]))
        member_rows = [
            {"archive_id": archive_id, "member_key": key, "ref_id": owners.get(key, (None,))[0]}
            for archive_id, _, key in keys
        ]
        for rows in _chunks(member_rows):
            upsert = insert(MEMBER).values(rows)
            # A member unmatched on an earlier delivery is matched now if its export exists.
            conn.execute(
                upsert.on_conflict_do_update(
                    index_elements=["archive_id", "member_key"],
                    set_={"ref_id": sa.func.coalesce(MEMBER.c.ref_id, upsert.excluded.ref_id)},
                )
            )
        archived: dict[str, str] = {}  # ref_id → path
        for _, path, key in keys:
            if key in owners:
                archived.setdefault(owners[key][0], path)
        _mark_archived(conn, archived, now)

    jobs, seen = [], set()
    for message in messages:
        jobs.append(
            RecordedJob(
                message.job_id,
                message.date,
                first_delivery=message.job_id in new_jobs and message.job_id not in seen,
                archives=[_outcome(a, owners) for a in message.archives],
            )
        )
        seen.add(message.job_id)
    return jobs


JOB = ArchiveJob.__table__  # type: ignore[attr-defined]
ARCHIVE = Archive.__table__  # type: ignore[attr-defined]
MEMBER = ArchiveMember.__table__  # type: ignore[attr-defined]
EVENT = EventRecord.__table__  # type: ignore[attr-defined]


def _chunks(rows: list[dict[str, Any]]) -> Iterable[list[dict[str, Any]]]:
    """Multi-row VALUES statements small enough for any driver's parameter limit."""
    for start in range(0, len(rows), QUERY_CHUNK):
        yield rows[start : start + QUERY_CHUNK]


def _insert_jobs(
    conn: sa.Connection, insert: Any, messages: Sequence[ArchiveMessage], now: datetime
) -> set[str]:
    """Insert the jobs not yet known; returns their ids."""
    rows = [
        {
            "job_id": m.job_id,
            "date": m.date,
            "archive_count": len(m.archives),
            "received_at": now,
            "message": m.document,
        }
        for m in messages
    ]
    new: set[str] = set()
    for chunk in _chunks(rows):
        statement = insert(JOB).values(chunk).on_conflict_do_nothing(index_elements=["job_id"])
        new.update(conn.scalars(statement.returning(JOB.c.job_id)))
    return new


def _export_owners(conn: sa.Connection, keys: set[str]) -> dict[str, tuple[str, str]]:
    """Bucket-prefixed key → (ref_id, partition key) of the export stored under it."""
    object_keys = sorted({key.split("/", 1)[1] for key in keys if "/" in key})
    owners: dict[str, tuple[str, str]] = {}
    for start in range(0, len(object_keys), QUERY_CHUNK):
        rows = conn.execute(
            sa.select(
                EVENT.c.ref_id, EVENT.c.bucket, EVENT.c.object_key, EVENT.c.partition_key
            ).where(EVENT.c.object_key.in_(object_keys[start : start + QUERY_CHUNK]))
        )
        for ref_id, bucket, object_key, partition_key in rows:
            if f"{bucket}/{object_key}" in keys:
                owners[f"{bucket}/{object_key}"] = (ref_id, partition_key)
    return owners


def _mark_archived(conn: sa.Connection, paths: dict[str, str], now: datetime) -> None:
    """Set archive_path (ref_id → path) on exports that have none: the first archive an
    export landed in is where it is, and a redelivery changes nothing."""
    pairs = list(paths.items())
    for start in range(0, len(pairs), QUERY_CHUNK):
        chunk = dict(pairs[start : start + QUERY_CHUNK])
        # CASE rather than UPDATE ... FROM (VALUES ...): SQLite cannot name VALUES columns.
        conn.execute(
            sa.update(EVENT)
            .where(EVENT.c.ref_id.in_(list(chunk)), EVENT.c.archive_path.is_(None))
            .values(archive_path=sa.case(chunk, value=EVENT.c.ref_id), archived_at=now)
        )


def _outcome(archive: ArchiveFile, owners: dict[str, tuple[str, str]]) -> RecordedArchive:
    by_partition: dict[str, list[str]] = defaultdict(list)
    for key in archive.src_keys:
        if key in owners:
            ref_id, partition_key = owners[key]
            by_partition[partition_key].append(ref_id)
    return RecordedArchive(
        path=archive.path,
        id=archive.id,
        member_count=len(archive.src_keys),
        by_partition=dict(by_partition),
        unmatched_keys=[key for key in archive.src_keys if key not in owners],
    )
