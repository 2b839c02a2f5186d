"""The catalog: one row per imaging event and the facts of its export (SQLModel).

The event, not the Dagster partition, is the unit of work and of truth. Every
state change here is a single conditional UPDATE, so two runs (or a run and a
purge) racing on one event can never both win.
"""

from __future__ import annotations

import enum
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import date as date_type
from functools import cache
from typing import Any

import sqlalchemy as sa
from dagster import ConfigurableResource
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import Column, Field, Session, SQLModel, col, select

from dlm_pipelines.archive_locations import ArchiveFile, ArchiveMessage
from dlm_pipelines.events import ImagingEvent
from dlm_pipelines.manifest import Manifest


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware datetimes on every backend; SQLite keeps no offset, so store UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} cannot be stored")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class EventStatus(enum.StrEnum):
    RECEIVED = "received"  # in the catalog, never tried
    EXPORTING = "exporting"  # claimed by a run (run_id)
    VERIFIED = "verified"  # in S3, size and sha256 checked by a HEAD
    FAILED = "failed"  # last attempt failed, see last_error
    # The store no longer matches the catalog (object missing, other size or sha256):
    # never purged; a re-export of the partition repairs it. Reason in last_error.
    NEEDS_ATTENTION = "needs_attention"
    # Verified, and held by a purge run (run_id) while it checks S3 and deletes the
    # local copy; no export may claim it meanwhile. Back to verified afterwards.
    PURGING = "purging"


def _dt(**kwargs: Any) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), **kwargs))


class EventRecord(SQLModel, table=True):
    __tablename__ = "imaging_event"
    __table_args__ = (
        sa.UniqueConstraint("bucket", "object_key", name="uq_imaging_event_object"),
        # The API's exports listing: verified uploads, newest first (migration 0003_api).
        sa.Index(
            "ix_imaging_event_exports",
            "event_type",
            sa.desc("uploaded_at"),
            "ref_id",
            postgresql_where=sa.text("verified_at IS NOT NULL AND object_key IS NOT NULL"),
            sqlite_where=sa.text("verified_at IS NOT NULL AND object_key IS NOT NULL"),
        ),
        # The imaging sensor's sweep and claims check: only the events in flight
        # (migration 0007), index-only whatever the catalog's size.
        sa.Index(
            "ix_imaging_event_unfinished",
            "status",
            "received_at",
            "partition_key",
            "run_id",
            postgresql_where=sa.text("status IN ('received', 'exporting')"),
            sqlite_where=sa.text("status IN ('received', 'exporting')"),
        ),
        # The sweep's queries (migration 0004): failed events by when they are due, and
        # verified events never announced. Both sets stay small, so the tick stays cheap.
        sa.Index(
            "ix_imaging_event_retries",
            "next_attempt_at",
            postgresql_where=sa.text("status = 'failed'"),
            sqlite_where=sa.text("status = 'failed'"),
        ),
        sa.Index(
            "ix_imaging_event_unannounced",
            "verified_at",
            postgresql_where=sa.text("status = 'verified' AND announced_at IS NULL"),
            sqlite_where=sa.text("status = 'verified' AND announced_at IS NULL"),
        ),
    )

    ref_id: str = Field(primary_key=True, max_length=36)
    stream_id: str = Field(max_length=64)
    system: str = Field(index=True, max_length=64)
    experiment_id: str = Field(index=True, max_length=128)
    event_type: str = Field(max_length=16)
    timestamp: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    partition_key: str = Field(index=True, max_length=96)
    local_path: str
    img_count: int
    event_metadata: dict[str, Any] = Field(sa_column=Column("metadata", sa.JSON, nullable=False))
    received_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    status: str = Field(default=EventStatus.RECEIVED, index=True, max_length=16)

    # the export
    bucket: str | None = Field(default=None, max_length=63)
    object_key: str | None = Field(default=None, max_length=1024)
    key_collision: bool = False  # object_key is the collision-free variant
    size: int | None = Field(default=None, sa_column=Column(sa.BigInteger))
    sha256: str | None = Field(default=None, max_length=64)
    etag: str | None = Field(default=None, max_length=128)  # the store's, as verified
    uploaded_at: datetime | None = _dt()
    verified_at: datetime | None = _dt(index=True)
    announced_at: datetime | None = _dt()
    run_id: str | None = Field(default=None, max_length=64)
    claimed_at: datetime | None = _dt()
    attempts: int = 0  # claims, step retries included
    export_runs: int = 0  # distinct runs that claimed it: what DLM_EXPORT_MAX_ATTEMPTS bounds
    next_attempt_at: datetime | None = _dt()  # failed: when the sweep retries it
    last_error: str | None = None

    # the local copy
    purged_at: datetime | None = _dt(index=True)
    bytes_freed: int | None = Field(default=None, sa_column=Column(sa.BigInteger))
    # where the purge renamed the local copy to; cleared once it is removed
    trash_path: str | None = Field(default=None, max_length=1024)

    # the tape archive (denormalised from archive_member for the lifecycle view)
    archive_path: str | None = Field(default=None, max_length=1024)
    archived_at: datetime | None = _dt()


class EventManifest(SQLModel, table=True):
    """What the event's tar holds, member by member (dlm_pipelines.manifest)."""

    __tablename__ = "event_manifest"

    ref_id: str = Field(
        sa_column=Column(
            sa.String(36),
            sa.ForeignKey("imaging_event.ref_id", ondelete="CASCADE"),
            primary_key=True,
        )
    )
    tar_sha256: str = Field(max_length=64)  # the tar it describes
    mtime_resolution_ns: int = Field(sa_column=Column(sa.BigInteger, nullable=False))
    source: str = Field(max_length=16)  # "export" (read from disk) or "backfill" (from the tar)
    members: list[dict[str, Any]] = Field(sa_column=Column(sa.JSON, nullable=False))
    recorded_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))

    def manifest(self) -> Manifest:
        return Manifest.from_json(self.members, self.mtime_resolution_ns)


class ArchiveJob(SQLModel, table=True):
    """One run of the tape archiver, also when it archived nothing (docs/contracts.md §4)."""

    __tablename__ = "archive_job"

    job_id: str = Field(primary_key=True, max_length=64)
    date: date_type = Field(index=True)
    archive_count: int
    received_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    message: dict[str, Any] = Field(sa_column=Column(sa.JSON, nullable=False))


class Archive(SQLModel, table=True):
    """One daily archive file; `id` is derived from `path`, so redelivery is a no-op."""

    __tablename__ = "archive"

    id: str = Field(primary_key=True, max_length=36)
    path: str = Field(unique=True, max_length=1024)
    event_type: str = Field(max_length=16)  # stitch | video | overview, from the path
    experiment_id: str = Field(index=True, max_length=128)
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    # None: recovered by reconciliation from an object's archived=true tag, no message.
    job_id: str | None = Field(default=None, foreign_key="archive_job.job_id", max_length=64)


class ArchiveMember(SQLModel, table=True):
    """One exported tar inside an archive file; ref_id is None when no export matched."""

    __tablename__ = "archive_member"

    archive_id: str = Field(foreign_key="archive.id", primary_key=True, max_length=36)
    member_key: str = Field(primary_key=True, max_length=1024)  # bucket-prefixed
    ref_id: str | None = Field(default=None, index=True, max_length=36)
    # archiver: named by a message; reconciled: recovered from the object's tape tag.
    origin: str = Field(
        default="archiver",
        sa_column=Column(sa.String(16), nullable=False, server_default="archiver"),
    )


class ReconcileReport(SQLModel, table=True):
    """One reconciliation (dlm_pipelines/reconciler.py); ran_at is None while it runs."""

    __tablename__ = "reconcile_report"

    id: int | None = Field(default=None, primary_key=True)
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    ran_at: datetime | None = _dt(index=True)
    run_id: str | None = Field(default=None, max_length=64)
    counts: dict[str, int] = Field(default_factory=dict, sa_column=Column(sa.JSON, nullable=False))
    scanned: dict[str, int] = Field(default_factory=dict, sa_column=Column(sa.JSON, nullable=False))
    closed: int = 0


class ReconcileFinding(SQLModel, table=True):
    """A drift between the catalog and a store, open from the first report that saw it
    until the first report that does not (then open_key is NULL and closed_* are set)."""

    __tablename__ = "reconcile_finding"
    __table_args__ = (
        sa.UniqueConstraint("open_key", name="uq_reconcile_finding_open_key"),
        sa.Index("ix_reconcile_finding_report", "last_report_id", "severity", "kind", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    open_key: str | None = Field(default=None, max_length=64)  # sha256 of kind and subject
    kind: str = Field(max_length=32)
    severity: str = Field(max_length=16)
    ref_id: str | None = Field(default=None, max_length=36)
    key: str | None = Field(default=None, max_length=1024)
    path: str | None = Field(default=None, max_length=2048)
    partition_key: str | None = Field(default=None, max_length=96)
    detail: str = Field(sa_column=Column(sa.Text, nullable=False))
    first_report_id: int = Field(foreign_key="reconcile_report.id")
    last_report_id: int = Field(foreign_key="reconcile_report.id")
    closed_report_id: int | None = Field(
        default=None, foreign_key="reconcile_report.id", index=True
    )
    first_seen_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    last_seen_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    closed_at: datetime | None = _dt()


# Typed handles of the tables, for SQLAlchemy Core statements (here and in the API).
EVENTS: sa.Table = SQLModel.metadata.tables[EventRecord.__tablename__]
ARCHIVE_JOBS: sa.Table = SQLModel.metadata.tables[ArchiveJob.__tablename__]
ARCHIVES: sa.Table = SQLModel.metadata.tables[Archive.__tablename__]
MEMBERS: sa.Table = SQLModel.metadata.tables[ArchiveMember.__tablename__]
REPORTS: sa.Table = SQLModel.metadata.tables[ReconcileReport.__tablename__]
FINDINGS: sa.Table = SQLModel.metadata.tables[ReconcileFinding.__tablename__]
MANIFESTS: sa.Table = SQLModel.metadata.tables[EventManifest.__tablename__]


def _rows(name: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> Any:
    """Literal rows to join an UPDATE with (a VALUES CTE): one statement for a batch."""
    if not rows:
        return None
    types = {"size": sa.BigInteger(), "freed": sa.BigInteger()}
    values = sa.values(*(sa.column(c, types.get(c, sa.String())) for c in columns), name=name)
    return values.data(rows).cte(name)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@cache
def get_engine(database_url: str) -> Engine:
    """One engine (and connection pool) per database URL and process."""
    if database_url.startswith("sqlite"):
        engine = sa.create_engine(
            database_url, connect_args={"check_same_thread": False, "timeout": 30}
        )
        sa.event.listen(engine, "connect", _configure_sqlite)
        return engine
    return sa.create_engine(database_url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrate(database_url: str) -> None:
    """Bring the catalog schema to the newest alembic revision."""
    from alembic import command
    from alembic.config import Config

    if database_url.startswith("sqlite:///"):
        from pathlib import Path

        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", "dlm_pipelines:migrations")
    config.attributes["engine"] = get_engine(database_url)
    command.upgrade(config, "heads")


# What intake writes per event; the rest of a new row is the same for all.
INTAKE_COLUMNS = (
    "ref_id",
    "stream_id",
    "system",
    "experiment_id",
    "event_type",
    "timestamp",
    "partition_key",
    "local_path",
    "img_count",
    "metadata",
)
_INTAKE_TYPES = {"timestamp": "timestamptz[]", "img_count": "integer[]"}
_INTAKE_UNNEST = f"""
INSERT INTO imaging_event ({", ".join(f'"{c}"' for c in INTAKE_COLUMNS)},
                           received_at, status, key_collision, attempts, export_runs)
SELECT {", ".join(f'"{c}"' for c in INTAKE_COLUMNS[:-1])}, CAST(metadata AS json),
       :received_at, :status, :key_collision, :attempts, :export_runs
FROM unnest({", ".join(f"CAST(:{c} AS {_INTAKE_TYPES.get(c, 'text[]')})" for c in INTAKE_COLUMNS)})
    AS batch({", ".join(f'"{c}"' for c in INTAKE_COLUMNS)})
ON CONFLICT (ref_id) DO NOTHING
RETURNING ref_id
"""


class Catalog(ConfigurableResource):
    """Every write to the catalog, and the reads of the pipelines: the event lifecycle
    and the archive entries. (The API reads the tables directly, see `dlm_api.tables`.)"""

    database_url: str

    @property
    def engine(self) -> Engine:
        return get_engine(self.database_url)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def _insert(self, table: sa.Table) -> Any:
        """INSERT with this backend's ON CONFLICT clauses."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    # --- intake ------------------------------------------------------------------------

    def record_events(
        self, items: Iterable[tuple[ImagingEvent, str, str]], received_at: datetime | None = None
    ) -> set[str]:
        """Insert (event, stream id, partition key) rows; returns the ref_ids that were new.

        Idempotent on ref_id: a repeated event keeps its first row. One INSERT ... ON
        CONFLICT DO NOTHING RETURNING: the rows it returns are the new ones.
        """
        columns: dict[str, list[Any]] = {name: [] for name in INTAKE_COLUMNS}
        for event, stream_id, partition_key in items:
            for name, value in zip(
                INTAKE_COLUMNS,
                (
                    event.ref_id,
                    stream_id,
                    event.system,
                    event.experiment_id,
                    event.type.value,
                    # in UTC, as UTCDateTime binds it: PostgreSQL refuses offsets past ±16 h
                    event.timestamp.astimezone(UTC),
                    partition_key,
                    event.local_path,
                    event.img_count,
                    # JSON text: pydantic's model_dump(mode="json") costs ~10× more
                    event.metadata.model_dump_json(),
                ),
                strict=True,
            ):
                columns[name].append(value)
        if not columns["ref_id"]:
            return set()
        fixed = {
            "received_at": received_at or utcnow(),
            "status": EventStatus.RECEIVED.value,
            "key_collision": False,
            "attempts": 0,
            "export_runs": 0,
        }
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # one array per column, unnested by the server: a few ms of client CPU for
                # thousands of rows, where a multi-row VALUES costs ~0.1 ms a row
                new = conn.scalars(sa.text(_INTAKE_UNNEST), columns | fixed)
            else:
                statement = (
                    self._insert(EVENTS)
                    .on_conflict_do_nothing(index_elements=["ref_id"])
                    .returning(EVENTS.c.ref_id)
                )
                rows = [
                    dict(zip(INTAKE_COLUMNS, values, strict=True)) | fixed
                    for values in zip(*columns.values(), strict=True)
                ]
                for row in rows:
                    row["metadata"] = json.loads(row["metadata"])
                new = conn.scalars(statement, rows)
            return {str(ref_id) for ref_id in new}

    def statuses(self, ref_ids: Sequence[str]) -> dict[str, str]:
        """The status of each of these events the catalog knows."""
        if not ref_ids:
            return {}
        query = sa.select(EVENTS.c.ref_id, EVENTS.c.status).where(EVENTS.c.ref_id.in_(ref_ids))
        with self.engine.connect() as conn:
            return {ref_id: status for ref_id, status in conn.execute(query)}

    # --- reads -------------------------------------------------------------------------

    def get(self, ref_id: str) -> EventRecord | None:
        with self.session() as session:
            return session.get(EventRecord, ref_id)

    def get_many(self, ref_ids: Sequence[str]) -> list[EventRecord]:
        with self.session() as session:
            return list(
                session.exec(select(EventRecord).where(col(EventRecord.ref_id).in_(ref_ids)))
            )

    def in_partition(self, partition_key: str, statuses: Iterable[str]) -> list[EventRecord]:
        with self.session() as session:
            query = (
                select(EventRecord)
                .where(EventRecord.partition_key == partition_key)
                .where(col(EventRecord.status).in_(list(statuses)))
                .order_by(col(EventRecord.timestamp), col(EventRecord.ref_id))
            )
            return list(session.exec(query))

    def ref_ids_in_partition(self, partition_key: str, status: str) -> list[str]:
        """The ref_ids of the partition's events in `status`: a warm run's cheap poll
        (no rows to build for the events it has taken already)."""
        query = sa.select(EVENTS.c.ref_id).where(
            EVENTS.c.partition_key == partition_key, EVENTS.c.status == status
        )
        with self.engine.connect() as conn:
            return list(conn.scalars(query))

    def stale_partitions(self, received_before: datetime) -> list[str]:
        """Partitions holding never-tried events received before the given time."""
        with self.session() as session:
            query = (
                select(EventRecord.partition_key)
                .where(EventRecord.status == EventStatus.RECEIVED)
                .where(col(EventRecord.received_at) < received_before)
                .distinct()
            )
            return list(session.exec(query))

    def claims(self) -> list[tuple[str, str]]:
        """(partition, run id) of every claim held now, for the sensor's liveness check."""
        with self.session() as session:
            query = (
                select(EventRecord.partition_key, EventRecord.run_id)
                .where(EventRecord.status == EventStatus.EXPORTING)
                .distinct()
            )
            return [(partition, run_id) for partition, run_id in session.exec(query) if run_id]

    # --- the export state machine --------------------------------------------------------

    def _update(self, ref_id: str, where: Any, **values: Any) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(EVENTS).where(EVENTS.c.ref_id == ref_id).where(where).values(**values)
            )
        return result.rowcount == 1

    def claim(
        self, ref_id: str, run_id: str, *, force: bool, run_is_alive: Callable[[str], bool]
    ) -> bool:
        """Take the event for `run_id`; False if another live run has it (or it is done).

        A claim held by a run that is no longer alive (killed daemon, crashed worker)
        is stale and may be taken over.
        """
        claimable: sa.ColumnElement[bool] = EVENTS.c.status.in_(
            [
                EventStatus.RECEIVED.value,
                EventStatus.FAILED.value,
                EventStatus.NEEDS_ATTENTION.value,
            ]
        )
        if force:
            # Not once purged: no local data is left to re-export (a purge may have
            # deleted it after the exporter looked).
            claimable = sa.or_(
                claimable,
                sa.and_(
                    EVENTS.c.status == EventStatus.VERIFIED.value, EVENTS.c.purged_at.is_(None)
                ),
            )
        take = {
            "status": EventStatus.EXPORTING.value,
            "run_id": run_id,
            "claimed_at": utcnow(),
            "attempts": EVENTS.c.attempts + 1,
            "export_runs": sa.case(
                (EVENTS.c.run_id.is_distinct_from(run_id), EVENTS.c.export_runs + 1),
                else_=EVENTS.c.export_runs,
            ),
        }
        if self._update(ref_id, claimable, **take):
            return True
        record = self.get(ref_id)
        if record is None or record.status != EventStatus.EXPORTING:
            return False
        holder = record.run_id
        if holder == run_id or (holder is not None and not run_is_alive(holder)):
            # Compare-and-set on the old holder, so only one taker wins.
            return self._update(
                ref_id,
                sa.and_(EVENTS.c.status == EventStatus.EXPORTING.value, EVENTS.c.run_id == holder),
                **take,
            )
        return False

    def assign_key(self, ref_id: str, bucket: str, key: str, *, collision: bool) -> bool:
        """Record the object key; False if another event already owns it."""
        try:
            return self._update(
                ref_id, sa.true(), bucket=bucket, object_key=key, key_collision=collision
            )
        except sa.exc.IntegrityError:
            return False

    def mark_verified(
        self,
        ref_id: str,
        run_id: str,
        *,
        size: int,
        sha256: str,
        etag: str | None = None,
        manifest: Manifest | None = None,
    ) -> datetime | None:
        """Record a verified upload (with its ETag and manifest, in one transaction);
        returns its time, or None if `run_id` lost the claim."""
        now = utcnow()
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.update(EVENTS)
                .where(
                    EVENTS.c.ref_id == ref_id,
                    EVENTS.c.run_id == run_id,
                    EVENTS.c.status == EventStatus.EXPORTING.value,
                )
                .values(
                    status=EventStatus.VERIFIED.value,
                    size=size,
                    sha256=sha256,
                    etag=etag,
                    uploaded_at=now,
                    verified_at=now,
                    announced_at=None,
                    last_error=None,
                )
            ).rowcount
            if done and manifest is not None:
                self._store_manifest(conn, ref_id, sha256, manifest, "export", replace=True)
        return now if done else None

    def release(self, ref_id: str, run_id: str, previous_status: str) -> None:
        """Give back a claim without an export (a refused or needless re-export)."""
        self._update(
            ref_id,
            sa.and_(EVENTS.c.run_id == run_id, EVENTS.c.status == EventStatus.EXPORTING.value),
            status=previous_status,
        )

    # --- manifests -----------------------------------------------------------------------

    def _store_manifest(
        self,
        conn: sa.Connection,
        ref_id: str,
        tar_sha256: str,
        manifest: Manifest,
        source: str,
        *,
        replace: bool,
    ) -> bool:
        row = {
            "ref_id": ref_id,
            "tar_sha256": tar_sha256,
            "mtime_resolution_ns": manifest.mtime_resolution_ns,
            "source": source,
            "members": manifest.as_json(),
            "recorded_at": utcnow(),
        }
        insert = self._insert(MANIFESTS).values(**row)
        if replace:
            statement = insert.on_conflict_do_update(
                index_elements=["ref_id"], set_={k: v for k, v in row.items() if k != "ref_id"}
            )
        else:
            statement = insert.on_conflict_do_nothing(index_elements=["ref_id"])
        return bool(conn.execute(statement).rowcount)

    def manifest(self, ref_id: str) -> EventManifest | None:
        with self.session() as session:
            return session.get(EventManifest, ref_id)

    def without_manifest(self, limit: int) -> list[EventRecord]:
        """Verified exports that have no manifest yet (exported before manifests)."""
        with self.session() as session:
            query = (
                select(EventRecord)
                .where(col(EventRecord.verified_at).is_not(None))
                .where(col(EventRecord.object_key).is_not(None))
                .where(~sa.exists().where(MANIFESTS.c.ref_id == col(EventRecord.ref_id)))
                .order_by(col(EventRecord.ref_id))
                .limit(limit)
            )
            return list(session.exec(query))

    def record_backfilled_manifest(
        self, ref_id: str, *, tar_sha256: str, etag: str, manifest: Manifest
    ) -> bool:
        """Store a manifest read back from the object, if the event still has that tar
        and no manifest; also records the object's ETag where none was."""
        with self.engine.begin() as conn:
            current = conn.execute(
                sa.select(EVENTS.c.sha256, EVENTS.c.etag).where(EVENTS.c.ref_id == ref_id)
            ).first()
            if current is None or current.sha256 != tar_sha256:
                return False
            stored = self._store_manifest(
                conn, ref_id, tar_sha256, manifest, "backfill", replace=False
            )
            if stored and current.etag is None:
                conn.execute(
                    sa.update(EVENTS)
                    .where(EVENTS.c.ref_id == ref_id, EVENTS.c.sha256 == tar_sha256)
                    .values(etag=etag)
                )
        return stored

    def mark_announced(self, ref_id: str) -> None:
        self._update(ref_id, sa.true(), announced_at=utcnow())

    def mark_failed(self, ref_id: str, run_id: str, error: str) -> None:
        self._update(
            ref_id,
            sa.and_(EVENTS.c.run_id == run_id, EVENTS.c.status == EventStatus.EXPORTING.value),
            status=EventStatus.FAILED.value,
            last_error=error[:4000],
            next_attempt_at=None,  # the sweep schedules the retry
        )

    # --- recovery (the sweep, dlm_pipelines/recovery.py) ---------------------------------

    def give_up(self, max_runs: int) -> list[tuple[str, str]]:
        """Failed events tried by `max_runs` runs → needs_attention; (ref_id, reason)."""
        reason = (
            sa.literal("gave up after ")
            + sa.cast(EVENTS.c.export_runs, sa.String())
            + sa.literal(" export runs: ")
            + sa.func.coalesce(EVENTS.c.last_error, "")
        )
        statement = (
            sa.update(EVENTS)
            .where(EVENTS.c.status == EventStatus.FAILED.value)
            .where(EVENTS.c.export_runs >= max_runs)
            .values(status=EventStatus.NEEDS_ATTENTION.value, last_error=reason)
            .returning(EVENTS.c.ref_id, EVENTS.c.last_error)
        )
        with self.engine.begin() as conn:
            return [(ref_id, error) for ref_id, error in conn.execute(statement)]

    def take_due_retries(
        self, now: datetime, delay_for: Callable[[int], float]
    ) -> list[tuple[str, str]]:
        """(ref_id, partition) of failed events due for a retry now.

        Each failed event gets its next attempt time (`delay_for(export runs so far)`
        seconds from now) the first time it is seen; a due one is pushed out by the same
        delay when taken, so a retry request that is lost is repeated later.
        """
        failed = EVENTS.c.status == EventStatus.FAILED.value
        query = sa.select(
            EVENTS.c.ref_id, EVENTS.c.partition_key, EVENTS.c.export_runs, EVENTS.c.next_attempt_at
        ).where(failed, sa.or_(EVENTS.c.next_attempt_at.is_(None), EVENTS.c.next_attempt_at <= now))
        with self.engine.begin() as conn:
            rows = list(conn.execute(query))
            by_runs: dict[int, list[str]] = {}
            for row in rows:
                by_runs.setdefault(row.export_runs, []).append(row.ref_id)
            for runs, ref_ids in by_runs.items():
                later = now + timedelta(seconds=delay_for(runs))
                conn.execute(
                    sa.update(EVENTS)
                    .where(failed, EVENTS.c.ref_id.in_(ref_ids))
                    .values(next_attempt_at=later)
                )
        return [(r.ref_id, r.partition_key) for r in rows if r.next_attempt_at is not None]

    def unannounced(self) -> list[EventRecord]:
        """Verified events whose announcement never happened (or was not recorded)."""
        with self.session() as session:
            query = (
                select(EventRecord)
                .where(EventRecord.status == EventStatus.VERIFIED)
                .where(col(EventRecord.announced_at).is_(None))
                .order_by(col(EventRecord.verified_at))
                .limit(1000)
            )
            return list(session.exec(query))

    def note(self, ref_ids: Sequence[str], message: str) -> None:
        """Say why never-tried events wait (shown as the lifecycle's `error`)."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(EVENTS)
                .where(EVENTS.c.ref_id.in_(list(ref_ids)))
                .where(EVENTS.c.status == EventStatus.RECEIVED.value)
                .values(last_error=message)
            )

    # --- the purge of local copies -------------------------------------------------------

    def unpurged(self, systems: Iterable[str]) -> list[EventRecord]:
        """Events of these systems whose local copy is not purged yet, oldest first."""
        with self.session() as session:
            query = (
                select(EventRecord)
                .where(col(EventRecord.purged_at).is_(None))
                .where(col(EventRecord.system).in_(list(systems)))
                .order_by(col(EventRecord.received_at), col(EventRecord.ref_id))
            )
            return list(session.exec(query))

    def unpurged_counts(self, excluding: Iterable[str]) -> dict[str, int]:
        """Events not purged per system, for the systems not in `excluding`."""
        with self.session() as session:
            query = (
                select(EventRecord.system, sa.func.count())
                .where(col(EventRecord.purged_at).is_(None))
                .where(col(EventRecord.system).not_in(list(excluding)))
                .group_by(col(EventRecord.system))
            )
            return {system: count for system, count in session.exec(query)}

    def claim_for_purge(self, records: Sequence[EventRecord], run_id: str) -> set[str]:
        """Hold these events for purging; returns the ref_ids held.

        One compare-and-set against each row as it was read: verified (or `purging` by
        the same stale holder), not purged, and the same object, size and sha256. So an
        event that a re-export claimed or re-verified meanwhile is not held.
        """

        def holder(record: EventRecord) -> str | None:
            return record.run_id if record.status == EventStatus.PURGING else None

        as_read = _rows(
            "as_read",
            ("ref_id", "bucket", "object_key", "size", "sha256", "holder"),
            [
                (r.ref_id, r.bucket, r.object_key, r.size, r.sha256, holder(r))
                for r in records
                if r.status in (EventStatus.VERIFIED, EventStatus.PURGING)
            ],
        )
        if as_read is None:
            return set()
        statement = (
            sa.update(EVENTS)
            .where(
                EVENTS.c.ref_id == as_read.c.ref_id,
                EVENTS.c.bucket == as_read.c.bucket,
                EVENTS.c.object_key == as_read.c.object_key,
                EVENTS.c.size == as_read.c.size,
                EVENTS.c.sha256 == as_read.c.sha256,
                EVENTS.c.purged_at.is_(None),
                sa.or_(
                    sa.and_(
                        EVENTS.c.status == EventStatus.VERIFIED.value, as_read.c.holder.is_(None)
                    ),
                    sa.and_(
                        EVENTS.c.status == EventStatus.PURGING.value,
                        EVENTS.c.run_id == as_read.c.holder,
                    ),
                ),
            )
            .values(status=EventStatus.PURGING.value, run_id=run_id)
            .returning(EVENTS.c.ref_id)
        )
        with self.engine.begin() as conn:
            return set(conn.scalars(statement))

    def finish_purges(
        self,
        run_id: str,
        *,
        purged: Sequence[tuple[EventRecord, int, str | None]] = (),
        released: Sequence[EventRecord] = (),
        kept: Sequence[tuple[EventRecord, str]] = (),
        alarms: Sequence[tuple[EventRecord, str]] = (),
    ) -> None:
        """End the holds of `run_id` in one statement: purged (with the bytes freed and
        the trash path the copy was renamed to), given back untouched, kept with the
        reason (the local tree differs from the manifest: shown in the lifecycle), or
        marked as needing attention (the store did not match).

        The export's run_id comes back: run_id names the run that made the object.
        """
        verified, attention = EventStatus.VERIFIED.value, EventStatus.NEEDS_ATTENTION.value
        ends = _rows(
            "ends",
            ("ref_id", "status", "maker", "freed", "trash", "error"),
            [(r.ref_id, verified, r.run_id, n, trash, None) for r, n, trash in purged]
            + [(r.ref_id, verified, r.run_id, None, None, None) for r in released]
            + [(r.ref_id, verified, r.run_id, None, None, why[:4000]) for r, why in kept]
            + [(r.ref_id, attention, r.run_id, None, None, why[:4000]) for r, why in alarms],
        )
        if ends is None:
            return
        freed = sa.cast(ends.c.freed, sa.BigInteger())  # PostgreSQL: text if all are NULL
        statement = (
            sa.update(EVENTS)
            .where(
                EVENTS.c.ref_id == ends.c.ref_id,
                EVENTS.c.status == EventStatus.PURGING.value,
                EVENTS.c.run_id == run_id,
            )
            .values(
                status=ends.c.status,
                run_id=ends.c.maker,
                purged_at=sa.case(
                    (freed.is_not(None), sa.literal(utcnow(), UTCDateTime())),
                    else_=EVENTS.c.purged_at,
                ),
                bytes_freed=sa.func.coalesce(freed, EVENTS.c.bytes_freed),
                trash_path=sa.func.coalesce(ends.c.trash, EVENTS.c.trash_path),
                last_error=sa.func.coalesce(ends.c.error, EVENTS.c.last_error),
            )
        )
        with self.engine.begin() as conn:
            conn.execute(statement)

    def manifests(self, ref_ids: Sequence[str]) -> dict[str, Manifest]:
        """The recorded manifests of these events (one query)."""
        if not ref_ids:
            return {}
        with self.session() as session:
            rows = session.exec(
                select(EventManifest).where(col(EventManifest.ref_id).in_(list(ref_ids)))
            )
            return {row.ref_id: row.manifest() for row in rows}

    def local_paths(self, system: str) -> list[str]:
        """The local_path of every event of `system` whose copy is not purged, sorted."""
        with self.session() as session:
            query = (
                select(EventRecord.local_path)
                .where(EventRecord.system == system)
                .where(col(EventRecord.purged_at).is_(None))
            )
            return sorted(session.exec(query))

    def record_trashed(self, ref_id: str, trash_path: str, bytes_freed: int) -> bool:
        """A copy found in the trash that no run recorded (killed between its rename and
        the record): the rename came only after the proof, so it is purged."""
        return self._update(
            ref_id,
            EVENTS.c.purged_at.is_(None),
            status=EventStatus.VERIFIED.value,
            purged_at=utcnow(),
            bytes_freed=bytes_freed,
            trash_path=trash_path,
        )

    def trash_emptied(self, ref_ids: Sequence[str]) -> None:
        if not ref_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(EVENTS).where(EVENTS.c.ref_id.in_(list(ref_ids))).values(trash_path=None)
            )

    # --- archive locations ---------------------------------------------------------------

    def record_archive_messages(
        self, messages: Sequence[ArchiveMessage], received_at: datetime | None = None
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
        files: dict[str, tuple[ArchiveFile, str]] = {}  # id → (archive, job_id); first wins
        for message in messages:
            for archive in message.archives:
                files.setdefault(archive.id, (archive, message.job_id))
        # An archive file named twice (the same message redelivered, or a re-run) has the
        # union of their keys as members.
        keys = {
            (a.id, a.path, key): None for m in messages for a in m.archives for key in a.src_keys
        }
        with self.engine.begin() as conn:
            new_jobs = self._insert_jobs(conn, messages, now)
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
                conn.execute(
                    self._insert(ARCHIVES)
                    .values(rows)
                    .on_conflict_do_nothing(index_elements=["id"])
                )
            member_rows = [
                {"archive_id": archive_id, "member_key": key, "ref_id": owners.get(key, (None,))[0]}
                for archive_id, _, key in keys
            ]
            for rows in _chunks(member_rows):
                upsert = self._insert(MEMBERS).values(rows)
                # A member unmatched on an earlier delivery is matched now if its export exists.
                conn.execute(
                    upsert.on_conflict_do_update(
                        index_elements=["archive_id", "member_key"],
                        set_={"ref_id": sa.func.coalesce(MEMBERS.c.ref_id, upsert.excluded.ref_id)},
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

    def _insert_jobs(
        self, conn: sa.Connection, messages: Sequence[ArchiveMessage], now: datetime
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
            statement = (
                self._insert(ARCHIVE_JOBS)
                .values(chunk)
                .on_conflict_do_nothing(index_elements=["job_id"])
            )
            new.update(conn.scalars(statement.returning(ARCHIVE_JOBS.c.job_id)))
        return new

    # --- reconciliation (dlm_pipelines/reconciler.py) -------------------------------------
    # Scans stream rows in the stores' own order (server-side cursor, bounded memory);
    # re-reads take the second catalog snapshot of docs/design.md's reconciliation.

    def _bytewise(self, expression: Any) -> Any:
        """Order like S3 listings and Python strings (PostgreSQL's locale would not)."""
        return expression.collate("C") if self.engine.dialect.name == "postgresql" else expression

    def _stream(self, statement: Any, chunk: int = 5000) -> Iterator[Any]:
        with self.engine.connect() as conn:
            yield from conn.execution_options(stream_results=True, yield_per=chunk).execute(
                statement
            )

    def exports_under(self, bucket: str, prefix: str) -> Iterator[Any]:
        """Rows holding an object key under `prefix` in `bucket`, in key order."""
        table = EVENTS
        return self._stream(
            sa.select(*RECONCILE_COLUMNS)
            .where(table.c.bucket == bucket, table.c.object_key.like(prefix + "%"))
            .order_by(self._bytewise(table.c.object_key))
        )

    def local_events(self, system: str) -> Iterator[Any]:
        """Every event of `system`, in the order of a depth-first walk of local paths
        with sorted names: '/' sorts before any character a name may hold."""
        table = EVENTS
        walk_order = sa.func.replace(table.c.local_path, "/", "\x01")
        return self._stream(
            sa.select(*RECONCILE_COLUMNS)
            .where(table.c.system == system)
            .order_by(self._bytewise(walk_order))
        )

    def in_states(self, statuses: Iterable[str]) -> Iterator[Any]:
        table = EVENTS
        return self._stream(sa.select(*RECONCILE_COLUMNS).where(table.c.status.in_(list(statuses))))

    def rows_by_ref(self, ref_ids: Iterable[str]) -> dict[str, Any]:
        table = EVENTS
        ids = list(ref_ids)
        with self.engine.connect() as conn:
            return {
                row.ref_id: row
                for start in range(0, len(ids), 1000)
                for row in conn.execute(
                    sa.select(*RECONCILE_COLUMNS).where(
                        table.c.ref_id.in_(ids[start : start + 1000])
                    )
                )
            }

    def owned_keys(self, bucket: str, keys: Iterable[str]) -> set[str]:
        """The keys among `keys` that an event of `bucket` holds."""
        table = EVENTS
        wanted = list(keys)
        with self.engine.connect() as conn:
            return {
                key
                for start in range(0, len(wanted), 1000)
                for key in conn.scalars(
                    sa.select(table.c.object_key).where(
                        table.c.bucket == bucket,
                        table.c.object_key.in_(wanted[start : start + 1000]),
                    )
                )
            }

    def named_paths(self, system: str, paths: Sequence[str]) -> set[str]:
        """The paths among `paths` that an event of `system` names, lies under or holds."""
        table = EVENTS
        named: set[str] = set()
        with self.engine.connect() as conn:
            for path in paths:
                hit = conn.scalar(
                    sa.select(table.c.ref_id)
                    .where(
                        table.c.system == system,
                        sa.or_(
                            table.c.local_path == path,
                            table.c.local_path.startswith(path + "/", autoescape=True),
                            sa.literal(path).startswith(table.c.local_path + "/"),
                        ),
                    )
                    .limit(1)
                )
                if hit is not None:
                    named.add(path)
        return named

    def start_report(self, started_at: datetime, run_id: str | None) -> int:
        with self.session() as session:
            report = ReconcileReport(started_at=started_at, run_id=run_id)
            session.add(report)
            session.commit()
            assert report.id is not None
            return report.id

    def record_findings(
        self, report_id: int, findings: Sequence[dict[str, Any]], seen_at: datetime
    ) -> None:
        """Open the new findings, and mark those open already as seen by this report.

        Each dict has open_key, kind, severity, ref_id, key, path, partition_key, detail.
        """
        if not findings:
            return
        table = FINDINGS
        rows = [
            {
                **f,
                "first_report_id": report_id,
                "last_report_id": report_id,
                "first_seen_at": seen_at,
                "last_seen_at": seen_at,
            }
            for f in {f["open_key"]: f for f in findings}.values()
        ]
        statement = self._insert(table)
        statement = statement.on_conflict_do_update(
            index_elements=["open_key"],
            set_={
                "severity": statement.excluded.severity,
                "detail": statement.excluded.detail,
                "partition_key": statement.excluded.partition_key,
                # Two reports at once (a run and `dlm reconcile`): the newer one's mark stays.
                "last_report_id": sa.case(
                    (
                        statement.excluded.last_report_id > table.c.last_report_id,
                        statement.excluded.last_report_id,
                    ),
                    else_=table.c.last_report_id,
                ),
                "last_seen_at": statement.excluded.last_seen_at,
            },
        )
        with self.engine.begin() as conn:
            for start in range(0, len(rows), 500):
                conn.execute(statement, rows[start : start + 500])

    def finish_report(
        self, report_id: int, counts: dict[str, int], scanned: dict[str, int], ran_at: datetime
    ) -> int:
        """Close every open finding this report did not see; returns how many."""
        findings = FINDINGS
        reports = REPORTS
        with self.engine.begin() as conn:
            closed = conn.execute(
                sa.update(findings)
                # `<`: a newer report running at the same time keeps what it saw open.
                .where(findings.c.open_key.is_not(None), findings.c.last_report_id < report_id)
                .values(open_key=None, closed_report_id=report_id, closed_at=ran_at)
            ).rowcount
            conn.execute(
                sa.update(reports)
                .where(reports.c.id == report_id)
                .values(ran_at=ran_at, counts=counts, scanned=scanned, closed=closed)
            )
        return int(closed)

    def latest_report(self) -> ReconcileReport | None:
        with self.session() as session:
            query = (
                select(ReconcileReport)
                .where(col(ReconcileReport.ran_at).is_not(None))
                .order_by(col(ReconcileReport.id).desc())
                .limit(1)
            )
            return session.exec(query).first()

    def report_partitions(
        self, report_id: int
    ) -> tuple[list[tuple[str | None, str, str, int]], list[tuple[str | None, str]]]:
        """(partition, kind, severity, count) of this report's findings, and
        (partition, kind) of the findings closed since the last report a Dagster run
        made (`dlm reconcile` closes findings too, but evaluates no asset check)."""
        table = FINDINGS
        reports = REPORTS
        group = (table.c.partition_key, table.c.kind, table.c.severity)
        with self.engine.connect() as conn:
            seen = conn.execute(
                sa.select(*group, sa.func.count())
                .where(table.c.last_report_id == report_id)
                .group_by(*group)
            )
            opened = [(p, k, s, n) for p, k, s, n in seen]
            last_run = conn.scalar(
                sa.select(sa.func.max(reports.c.id)).where(
                    reports.c.id < report_id, reports.c.run_id.is_not(None)
                )
            )
            closed = conn.execute(
                sa.select(table.c.partition_key, table.c.kind)
                .where(
                    table.c.closed_report_id > (last_run or 0),
                    table.c.closed_report_id <= report_id,
                )
                .distinct()
            )
            return opened, [(p, k) for p, k in closed]

    def findings_of(self, report_id: int, partition_key: str | None = None) -> list[Any]:
        table = FINDINGS
        query = sa.select(table).where(table.c.last_report_id == report_id)
        if partition_key is not None:
            query = query.where(table.c.partition_key == partition_key)
        with self.engine.connect() as conn:
            return list(conn.execute(query.order_by(table.c.id).limit(10_000)))

    def record_recovered_archives(
        self, locations: Sequence[tuple[str, str, str, str, str, str]], now: datetime
    ) -> int:
        """(ref_id, bucket-prefixed key, archive id, archive path, event type, experiment)
        of exports whose tape tag says where they are: the archive (without a job), the
        member with origin "reconciled", and the event's archive_path if it has none.
        Idempotent, and a no-op for an export that got its location meanwhile."""
        if not locations:
            return 0
        archives = ARCHIVES
        members = MEMBERS
        events = EVENTS
        recorded = 0
        with self.engine.begin() as conn:
            for ref_id, member_key, archive_id, path, event_type, experiment_id in locations:
                marked = conn.execute(
                    sa.update(events)
                    .where(events.c.ref_id == ref_id, events.c.archive_path.is_(None))
                    .values(archive_path=path, archived_at=now)
                ).rowcount
                if not marked:
                    continue
                conn.execute(
                    self._insert(archives)
                    .values(
                        id=archive_id,
                        path=path,
                        event_type=event_type,
                        experiment_id=experiment_id,
                        created_at=now,
                        job_id=None,
                    )
                    .on_conflict_do_nothing(index_elements=["id"])
                )
                conn.execute(
                    self._insert(members)
                    .values(
                        archive_id=archive_id, member_key=member_key, ref_id=ref_id,
                        origin="reconciled",
                    )
                    .on_conflict_do_nothing(index_elements=["archive_id", "member_key"])
                )  # fmt: skip
                recorded += 1
        return recorded

    def adopt_export(self, row: dict[str, Any]) -> bool:
        """Record an export the catalog never saw (a legacy object); False if its ref_id
        or its key is catalogued already."""
        table = EVENTS
        try:
            with self.engine.begin() as conn:
                done = conn.execute(
                    self._insert(table)
                    .values(**row)
                    .on_conflict_do_nothing(index_elements=["ref_id"])
                ).rowcount
        except sa.exc.IntegrityError:  # another event holds the key
            return False
        return bool(done)


# --- archive locations: helpers of Catalog.record_archive_messages ---------------------------

QUERY_CHUNK = 1000  # keys per IN (...) lookup or rows per INSERT


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
    date: date_type
    first_delivery: bool  # False: the job was already in the catalog (a redelivery)
    archives: list[RecordedArchive] = field(default_factory=list)

    @property
    def unmatched_keys(self) -> list[str]:
        return [key for archive in self.archives for key in archive.unmatched_keys]


def _chunks(rows: list[dict[str, Any]]) -> Iterable[list[dict[str, Any]]]:
    """Multi-row VALUES statements small enough for any driver's parameter limit."""
    for start in range(0, len(rows), QUERY_CHUNK):
        yield rows[start : start + QUERY_CHUNK]


def _export_owners(conn: sa.Connection, keys: set[str]) -> dict[str, tuple[str, str]]:
    """Bucket-prefixed key → (ref_id, partition key) of the export stored under it."""
    object_keys = sorted({key.split("/", 1)[1] for key in keys if "/" in key})
    owners: dict[str, tuple[str, str]] = {}
    for start in range(0, len(object_keys), QUERY_CHUNK):
        rows = conn.execute(
            sa.select(
                EVENTS.c.ref_id, EVENTS.c.bucket, EVENTS.c.object_key, EVENTS.c.partition_key
            ).where(EVENTS.c.object_key.in_(object_keys[start : start + QUERY_CHUNK]))
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
            sa.update(EVENTS)
            .where(EVENTS.c.ref_id.in_(list(chunk)), EVENTS.c.archive_path.is_(None))
            .values(archive_path=sa.case(chunk, value=EVENTS.c.ref_id), archived_at=now)
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


RECONCILE_COLUMNS = tuple(
    EVENTS.c[name]
    for name in (
        "ref_id",
        "system",
        "experiment_id",
        "event_type",
        "partition_key",
        "local_path",
        "status",
        "received_at",
        "claimed_at",
        "attempts",
        "bucket",
        "object_key",
        "size",
        "sha256",
        "etag",
        "uploaded_at",
        "verified_at",
        "purged_at",
        "archive_path",
        "next_attempt_at",
    )
)
