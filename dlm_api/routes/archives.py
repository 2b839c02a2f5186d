"""Legacy archive routes (docs/contracts.md §5): the tape archiver's daily files and their members.

Order: newest archive first, ties by id. Each summary's `url` is relative to the
API's base URL, as existing clients follow it.
"""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine

from dlm_api.deps import ServicesDep
from dlm_api.schemas import (
    OFFSET_MAX,
    ArchiveDetail,
    ArchiveMemberItem,
    ArchivePage,
    ArchiveSummary,
    NameFilter,
)
from dlm_api.tables import ARCHIVES, EVENTS, MEMBERS, count_and_page

router = APIRouter(tags=["legacy"])

ArchiveId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": 'No such archive: `{"detail": "item not found"}`'}
}


def archive_url(archive_id: str) -> str:
    return f"/api/1/archives/{archive_id}"


@router.get("/archives")
async def list_archives(
    services: ServicesDep,
    experiment_id: NameFilter = None,
    offset: Annotated[int, Query(ge=0, le=OFFSET_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
) -> ArchivePage:
    return await run_in_threadpool(archive_page, services.engine, experiment_id, offset, limit)


def archive_page(engine: Engine, experiment_id: str | None, offset: int, limit: int) -> ArchivePage:
    where = [ARCHIVES.c.experiment_id == experiment_id] if experiment_id else []
    member_count = (
        sa.select(sa.func.count())
        .where(MEMBERS.c.archive_id == ARCHIVES.c.id)
        .correlate(ARCHIVES)
        .scalar_subquery()
    )
    with engine.connect() as connection:
        count, rows = count_and_page(
            connection,
            ARCHIVES,
            (ARCHIVES, member_count.label("member_count")),
            where=where,
            order_by=(ARCHIVES.c.created_at.desc(), ARCHIVES.c.id),
            limit=limit,
            offset=offset,
        )
    return ArchivePage(
        count=count,
        data=[
            ArchiveSummary(
                id=row.id,
                path=row.path,
                type=row.event_type,
                experiment_id=row.experiment_id,
                created_at=row.created_at,
                url=archive_url(row.id),
                member_count=row.member_count,
            )
            for row in rows
        ],
    )


@router.get("/archives/{id}", responses=NOT_FOUND)
async def read_archive(id: ArchiveId, services: ServicesDep) -> ArchiveDetail:
    return await run_in_threadpool(archive_detail, services.engine, id)


def archive_detail(engine: Engine, archive_id: str) -> ArchiveDetail:
    with engine.connect() as connection:
        archive = connection.execute(sa.select(ARCHIVES).where(ARCHIVES.c.id == archive_id)).first()
        if archive is None:
            raise HTTPException(status_code=404, detail="item not found")
        members = connection.execute(
            sa.select(
                MEMBERS.c.member_key,
                MEMBERS.c.ref_id,
                EVENTS.c.timestamp,
                EVENTS.c.sha256,
                EVENTS.c.size,
            )
            .select_from(MEMBERS.outerjoin(EVENTS, EVENTS.c.ref_id == MEMBERS.c.ref_id))
            .where(MEMBERS.c.archive_id == archive_id)
            .order_by(MEMBERS.c.member_key)
        ).all()
    return ArchiveDetail(
        id=archive.id,
        path=archive.path,
        type=archive.event_type,
        experiment_id=archive.experiment_id,
        created_at=archive.created_at,
        members=[
            ArchiveMemberItem(
                member_key=m.member_key,
                ref_id=m.ref_id,
                timestamp=m.timestamp,
                checksum=m.sha256,
                size=m.size,
            )
            for m in members
        ],
    )
