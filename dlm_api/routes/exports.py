"""Legacy `GET /api/1/exports` (docs/contracts.md §5): verified uploads with presigned URLs.

An export is an event with a verified upload: `verified_at` and `object_key` set,
whatever its status since (a purge, a forced re-export in flight, or
needs_attention after the store changed all keep the verified upload listed).
Order: newest upload first, ties by ref_id, so offset paging over a fixed window
neither repeats nor skips an export.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from dlm_api.deps import CallerDep, Services, ServicesDep
from dlm_api.schemas import OFFSET_MAX, ExportItem, ExportPage, UTCDatetime
from dlm_api.tables import EVENTS, count_and_page
from dlm_pipelines.catalog import utcnow
from dlm_pipelines.events import EventType

router = APIRouter(tags=["legacy"])
audit = logging.getLogger("dlm_api.downloads")

EXPORT_COLUMNS = (
    EVENTS.c.ref_id,
    EVENTS.c.experiment_id,
    EVENTS.c.timestamp,
    EVENTS.c.event_type,
    EVENTS.c.uploaded_at,
    EVENTS.c.bucket,
    EVENTS.c.object_key,
    EVENTS.c.size,
    EVENTS.c.sha256,
)


def exports_page(
    connection: sa.Connection,
    *,
    event_type: str,
    start: datetime,
    end: datetime,
    limit: int,
    offset: int,
) -> tuple[int, list[Any]]:
    """(exports in the window, one page of them); the partial index of migration 0003
    serves both the count and the ordered page."""
    where = (
        EVENTS.c.verified_at.is_not(None),
        EVENTS.c.object_key.is_not(None),
        EVENTS.c.event_type == event_type,
        EVENTS.c.uploaded_at > start,
        EVENTS.c.uploaded_at < end,
    )
    return count_and_page(
        connection,
        EVENTS,
        EXPORT_COLUMNS,
        where=where,
        order_by=(EVENTS.c.uploaded_at.desc(), EVENTS.c.ref_id),
        limit=limit,
        offset=offset,
    )


@router.get("/exports")
async def list_exports(
    services: ServicesDep,
    caller: CallerDep,
    start: Annotated[UTCDatetime | None, Query(description="Default: 24 h before now.")] = None,
    end: Annotated[UTCDatetime | None, Query(description="Default: now.")] = None,
    event_type: EventType = EventType.STITCH,
    limit: Annotated[int, Query(ge=1, le=500)] = 500,
    offset: Annotated[int, Query(ge=0, le=OFFSET_MAX)] = 0,
) -> ExportPage:
    """Exports uploaded in `(start, end)`, newest first, each with a presigned URL."""
    end = end or utcnow()
    if start is None:
        try:
            start = end - timedelta(hours=24)
        except OverflowError:  # an `end` in year 1
            start = datetime.min.replace(tzinfo=UTC)
    count, data = await run_in_threadpool(
        export_items, services, event_type=event_type, start=start, end=end, limit=limit,
        offset=offset,
    )  # fmt: skip
    if data:
        audit.info(
            "minted %d download links for token %s: %s",
            len(data),
            caller,
            " ".join(item.ref_id for item in data),
        )
    return ExportPage(count=count, data=data, start=start, end=end)


def export_items(services: Services, **window: Any) -> tuple[int, list[ExportItem]]:
    """The blocking part (catalog, then signing): one trip through the threadpool."""
    with services.engine.connect() as connection:
        count, rows = exports_page(connection, **window)
    urls = services.presigner.many([(row.bucket, row.object_key) for row in rows])
    return count, [
        ExportItem(
            ref_id=row.ref_id,
            experiment_id=row.experiment_id,
            timestamp=row.timestamp,
            type=row.event_type,
            url=url,
            uploaded_at=row.uploaded_at,
            key=f"{row.bucket}/{row.object_key}",
            size=row.size,
            sha256=row.sha256,
        )
        for row, url in zip(rows, urls, strict=True)
    ]
