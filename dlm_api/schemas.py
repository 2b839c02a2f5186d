"""Request parameter types and response models.

The legacy models (exports, archives, daily stats) keep every field docs/contracts.md §5
names, with its name and type; fields after them are additions.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated

from fastapi import Query
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from dlm_pipelines.catalog import EventStatus
from dlm_pipelines.events import EventType


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
        raise ValueError("datetime is out of range once converted to UTC") from None


# A query datetime: must carry an offset (naive → 422), normalised to UTC.
UTCDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
# Name filters match catalog values exactly; these are the characters names may hold.
NAME_RULES = {"min_length": 1, "max_length": 128, "pattern": r"^[A-Za-z0-9._-]+$"}
NameFilter = Annotated[str | None, Query(**NAME_RULES)]  # a query parameter
SearchName = Annotated[str | None, Field(**NAME_RULES)]  # a field of a query model
OFFSET_MAX = 1_000_000_000


class EventSearch(BaseModel):
    """Filters and paging of `GET /api/1/events`. An unknown parameter is a 422, not
    silently ignored: `?type=video` (the field is `event_type`) must not list every type."""

    model_config = ConfigDict(extra="forbid")

    experiment_id: SearchName = None
    system: SearchName = None
    event_type: EventType | None = None
    status: EventStatus | None = None
    start: UTCDatetime | None = Field(None, description="Events at or after.")
    end: UTCDatetime | None = Field(None, description="Events before.")
    limit: int = Field(100, ge=1, le=500)
    offset: int = Field(0, ge=0, le=OFFSET_MAX)


# --- legacy: exports -------------------------------------------------------------------


class ExportItem(BaseModel):
    ref_id: str
    experiment_id: str
    timestamp: AwareDatetime  # of the imaging event
    type: EventType
    url: str = Field(description="Presigned GET of the tar; expires after DLM_PRESIGN_EXPIRES.")
    uploaded_at: AwareDatetime
    key: str = Field(description="Bucket-prefixed object key, as on dlm:new-export.")
    size: int | None
    sha256: str | None


class ExportPage(BaseModel):
    count: int = Field(description="Exports in the window (all pages).")
    data: list[ExportItem]
    start: AwareDatetime = Field(description="The window applied; pass it back to page.")
    end: AwareDatetime = Field(description="The window applied; pass it back to page.")


# --- legacy: archives ------------------------------------------------------------------


class ArchiveSummary(BaseModel):
    id: str
    path: str
    type: EventType
    experiment_id: str
    created_at: AwareDatetime
    url: str = Field(description="Relative to the API's base URL.")
    member_count: int


class ArchivePage(BaseModel):
    count: int
    data: list[ArchiveSummary]


class ArchiveMemberItem(BaseModel):
    member_key: str
    # None when no exported event matches the member's key.
    ref_id: str | None
    timestamp: AwareDatetime | None
    checksum: str | None = Field(description="sha256 of the member tar, hex.")
    size: int | None


class ArchiveDetail(BaseModel):
    id: str
    path: str
    type: EventType
    experiment_id: str
    created_at: AwareDatetime
    members: list[ArchiveMemberItem]


# --- legacy: daily stats ---------------------------------------------------------------


class DailyStats(BaseModel):
    date: date
    event_count: int
    export_count: int
    archive_count: int
    bytes_exported: int
    purge_count: int
    bytes_purged: int


# --- events and their lifecycle ----------------------------------------------------------


class EventSummary(BaseModel):
    ref_id: str
    system: str
    experiment_id: str
    type: EventType
    timestamp: AwareDatetime
    status: EventStatus
    size: int | None
    verified_at: AwareDatetime | None
    purged_at: AwareDatetime | None
    archive_path: str | None
    url: str = Field(description="The event's lifecycle, relative to the API's base URL.")


class EventPage(BaseModel):
    count: int
    data: list[EventSummary]


class ExportInfo(BaseModel):
    key: str = Field(description="Bucket-prefixed object key.")
    size: int | None
    sha256: str | None
    uploaded_at: AwareDatetime | None
    verified_at: AwareDatetime | None
    download_url: str | None = Field(
        description="Permalink answering 307 to a fresh presigned URL (once verified)."
    )


class RunInfo(BaseModel):
    run_id: str
    status: str | None = Field(description="Dagster run status; None if Dagster has no such run.")
    url: str = Field(description="The run in the Dagster UI.")


class ArchiveLocation(BaseModel):
    path: str
    archived_at: AwareDatetime | None
    url: str | None = Field(description="The archive, relative to the API's base URL.")


class PurgeInfo(BaseModel):
    purged_at: AwareDatetime
    bytes_freed: int | None


class EventLifecycle(BaseModel):
    ref_id: str
    system: str
    experiment_id: str
    type: EventType
    timestamp: AwareDatetime
    local_path: str
    img_count: int
    status: EventStatus
    received_at: AwareDatetime
    attempts: int
    export: ExportInfo | None
    run: RunInfo | None = Field(description="The Dagster run that last claimed the event.")
    archive: ArchiveLocation | None
    purge: PurgeInfo | None
    error: str | None = Field(description="The last export error, if any.")


# --- reconciliation ----------------------------------------------------------------------


class FindingItem(BaseModel):
    kind: str = Field(description="object_missing, object_mismatch, object_without_event, ...")
    severity: str = Field(description="alarm, warning or info")
    ref_id: str | None
    key: str | None = Field(description="Object key inside the bucket.")
    path: str | None = Field(description="<system>/<local path> under the data root.")
    partition_key: str | None
    detail: str
    first_seen_at: AwareDatetime = Field(description="Open since this time (earlier reports).")


class ReconciliationReport(BaseModel):
    report_id: int
    started_at: AwareDatetime
    ran_at: AwareDatetime
    counts: dict[str, int] = Field(description="Findings per kind (all pages).")
    scanned: dict[str, int]
    closed: int = Field(description="Findings of earlier reports that this one no longer saw.")
    count: int = Field(description="Findings matching the filters (all pages).")
    findings: list[FindingItem]


# --- the manifest: what an event's tar holds, file by file ----------------------------------


class ManifestFile(BaseModel):
    path: str = Field(description="Relative to the tar's root (where it is extracted).")
    size: int
    sha256: str | None
    mtime_ns: int = Field(description="The file's mtime when it was exported, nanoseconds.")


class ManifestTar(BaseModel):
    key: str = Field(description="Bucket-prefixed object key.")
    size: int | None
    sha256: str | None
    etag: str | None = Field(description="The object store's ETag of the tar.")


class EventManifestResponse(BaseModel):
    ref_id: str
    tar: ManifestTar
    files: list[ManifestFile]
    verified_at: AwareDatetime | None
    archive_path: str | None
    purged_at: AwareDatetime | None
    source: str = Field(
        description="`export`: recorded from disk while the tar was made; `backfill`: read "
        "back from the tar (mtimes in whole seconds)."
    )
