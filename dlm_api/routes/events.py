"""Imaging events: search, the whole lifecycle of one, and a download permalink."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, RedirectResponse
from sqlalchemy.engine import Engine

from dlm_api.deps import CallerDep, Services, ServicesDep
from dlm_api.routes.archives import archive_url
from dlm_api.schemas import (
    ArchiveLocation,
    EventLifecycle,
    EventManifestResponse,
    EventPage,
    EventSearch,
    EventSummary,
    ExportInfo,
    ManifestFile,
    ManifestTar,
    PurgeInfo,
    RunInfo,
)
from dlm_api.tables import ARCHIVES, EVENTS, MANIFESTS, count_and_page
from dlm_pipelines.manifest import Manifest

router = APIRouter(tags=["events"])
audit = logging.getLogger("dlm_api.downloads")

RefId = Annotated[str, Path(max_length=36, pattern=r"^[0-9A-Fa-f-]+$")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such event (or, for a download, no verified export)."}
}


SUMMARY_COLUMNS = (
    EVENTS.c.ref_id,
    EVENTS.c.system,
    EVENTS.c.experiment_id,
    EVENTS.c.event_type,
    EVENTS.c.timestamp,
    EVENTS.c.status,
    EVENTS.c.size,
    EVENTS.c.verified_at,
    EVENTS.c.purged_at,
    EVENTS.c.archive_path,
)


def event_url(ref_id: str) -> str:
    return f"/api/1/events/{ref_id}"


def download_url(ref_id: str) -> str:
    return f"/api/1/events/{ref_id}/download"


@router.get("/events")
async def list_events(services: ServicesDep, search: Annotated[EventSearch, Query()]) -> EventPage:
    """Events by imaging time, newest first (ties by ref_id), with their current state."""
    filters = {
        EVENTS.c.experiment_id: search.experiment_id,
        EVENTS.c.system: search.system,
        EVENTS.c.event_type: search.event_type,
        EVENTS.c.status: search.status,
    }
    where = [column == value for column, value in filters.items() if value is not None]
    if search.start is not None:
        where.append(EVENTS.c.timestamp >= search.start)
    if search.end is not None:
        where.append(EVENTS.c.timestamp < search.end)
    return await run_in_threadpool(event_page, services.engine, where, search.limit, search.offset)


def event_page(engine: Engine, where: list[Any], limit: int, offset: int) -> EventPage:
    with engine.connect() as connection:
        count, rows = count_and_page(
            connection,
            EVENTS,
            SUMMARY_COLUMNS,
            where=where,
            order_by=(EVENTS.c.timestamp.desc(), EVENTS.c.ref_id),
            limit=limit,
            offset=offset,
        )
    return EventPage(
        count=count,
        data=[
            EventSummary(
                ref_id=row.ref_id,
                system=row.system,
                experiment_id=row.experiment_id,
                type=row.event_type,
                timestamp=row.timestamp,
                status=row.status,
                size=row.size,
                verified_at=row.verified_at,
                purged_at=row.purged_at,
                archive_path=row.archive_path,
                url=event_url(row.ref_id),
            )
            for row in rows
        ],
    )


def _event_row(connection: sa.Connection, ref_id: str) -> Any:
    row = connection.execute(sa.select(EVENTS).where(EVENTS.c.ref_id == ref_id.lower())).first()
    if row is None:
        raise HTTPException(status_code=404, detail=f"no event with ref_id {ref_id}")
    return row


@router.get("/events/{ref_id}", responses=NOT_FOUND)
async def read_event(ref_id: RefId, services: ServicesDep) -> EventLifecycle:
    """Everything that happened to one event: received, exported, archived, purged."""
    return await run_in_threadpool(event_lifecycle, services, ref_id)


def event_lifecycle(services: Services, ref_id: str) -> EventLifecycle:
    with services.engine.connect() as connection:
        row = _event_row(connection, ref_id)
        archive_id = None
        if row.archive_path is not None:
            archive_id = connection.scalar(
                sa.select(ARCHIVES.c.id).where(ARCHIVES.c.path == row.archive_path)
            )
    verified = row.verified_at is not None and row.object_key is not None
    return EventLifecycle(
        ref_id=row.ref_id,
        system=row.system,
        experiment_id=row.experiment_id,
        type=row.event_type,
        timestamp=row.timestamp,
        local_path=row.local_path,
        img_count=row.img_count,
        status=row.status,
        received_at=row.received_at,
        attempts=row.attempts,
        export=None
        if row.object_key is None
        else ExportInfo(
            key=f"{row.bucket}/{row.object_key}",
            size=row.size,
            sha256=row.sha256,
            uploaded_at=row.uploaded_at,
            verified_at=row.verified_at,
            download_url=download_url(row.ref_id) if verified else None,
        ),
        run=None
        if row.run_id is None
        else RunInfo(
            run_id=row.run_id,
            status=services.run_statuses.status_of(row.run_id),
            url=services.dagster_run_url(row.run_id),
        ),
        archive=None
        if row.archive_path is None
        else ArchiveLocation(
            path=row.archive_path,
            archived_at=row.archived_at,
            url=archive_url(archive_id) if archive_id else None,
        ),
        purge=None
        if row.purged_at is None
        else PurgeInfo(purged_at=row.purged_at, bytes_freed=row.bytes_freed),
        error=row.last_error,
    )


@router.get(
    "/events/{ref_id}/download",
    response_class=RedirectResponse,
    status_code=307,
    responses={307: {"description": "Redirect to a freshly presigned GET URL."}, **NOT_FOUND},
)
async def download_event(
    ref_id: RefId, services: ServicesDep, caller: CallerDep
) -> RedirectResponse:
    """A permalink to the event's tar: each call mints a new presigned URL."""
    url, ref_id = await run_in_threadpool(mint_download_url, services, ref_id)
    audit.info("minted a download link for token %s: %s", caller, ref_id)
    return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})


def mint_download_url(services: Services, ref_id: str) -> tuple[str, str]:
    with services.engine.connect() as connection:
        row = _event_row(connection, ref_id)
    if row.verified_at is None or row.object_key is None or row.bucket is None:
        raise HTTPException(status_code=404, detail=f"event {ref_id} has no verified export")
    return services.presigner.one(row.bucket, row.object_key), row.ref_id


@router.get(
    "/events/{ref_id}/manifest",
    response_model=EventManifestResponse,
    responses={
        200: {
            "content": {"text/plain": {}},
            "description": "JSON, or with `format=sha256sum` the files as `sha256sum -c` "
            "input: extract the tar, then `sha256sum -c` in that folder.",
        },
        404: {"description": "No such event, no verified export, or no manifest yet."},
    },
)
async def read_manifest(
    ref_id: RefId,
    services: ServicesDep,
    format: Annotated[Literal["json", "sha256sum"], Query()] = "json",
) -> Any:
    """The proof of custody: every file of the event's tar with its sha256, and the
    tar's own key, size, sha256 and ETag."""
    response, manifest = await run_in_threadpool(event_manifest, services, ref_id)
    if format == "sha256sum":
        return PlainTextResponse(manifest.sha256sum())
    return response


def event_manifest(services: Services, ref_id: str) -> tuple[EventManifestResponse, Manifest]:
    with services.engine.connect() as connection:
        row = _event_row(connection, ref_id)
        if row.verified_at is None or row.object_key is None:
            raise HTTPException(status_code=404, detail=f"event {ref_id} has no verified export")
        recorded = connection.execute(
            sa.select(MANIFESTS).where(MANIFESTS.c.ref_id == row.ref_id)
        ).first()
    if recorded is None:
        raise HTTPException(
            status_code=404,
            detail=f"event {ref_id} was exported before manifests were recorded; "
            "`dlm backfill-manifests` reads them from the stored tars",
        )
    manifest = Manifest.from_json(recorded.members, recorded.mtime_resolution_ns)
    response = EventManifestResponse(
        ref_id=row.ref_id,
        tar=ManifestTar(
            key=f"{row.bucket}/{row.object_key}", size=row.size, sha256=row.sha256, etag=row.etag
        ),
        files=[
            ManifestFile(path=m.path, size=m.size, sha256=m.sha256, mtime_ns=m.mtime_ns)
            for m in manifest.files()
        ],
        verified_at=row.verified_at,
        archive_path=row.archive_path,
        purged_at=row.purged_at,
        source=recorded.source,
    )
    return response, manifest
