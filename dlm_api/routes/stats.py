"""Legacy `GET /api/1/daily-stats`, extended with bytes exported and purged.

One row per UTC day of the last seven that saw any activity, newest first.
An export counts on the day it was verified; an archive member on the day its
archive was recorded; a purge on the day the local copy was deleted. Each
measure is one indexed range query grouped by day.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine

from dlm_api.deps import ServicesDep
from dlm_api.schemas import DailyStats
from dlm_api.tables import ARCHIVES, EVENTS, MEMBERS, utc_day
from dlm_pipelines.catalog import utcnow

router = APIRouter(tags=["legacy"])
DAYS = 7
COUNTERS = [name for name in DailyStats.model_fields if name != "date"]


@router.get("/daily-stats")
async def daily_stats(services: ServicesDep) -> list[DailyStats]:
    return await run_in_threadpool(last_days, services.engine)


def _per_day(column: Any, since: datetime, *measures: Any, join: Any = None) -> sa.Select:
    day = utc_day(column)
    query = sa.select(day.label("day"), *measures)
    if join is not None:
        query = query.select_from(join)
    return query.where(column >= since).group_by(day)


def last_days(engine: Engine) -> list[DailyStats]:
    today = utcnow().date()
    since = datetime.combine(today - timedelta(days=DAYS - 1), time(), tzinfo=UTC)
    queries = {
        ("event_count",): _per_day(EVENTS.c.timestamp, since, sa.func.count()),
        ("export_count", "bytes_exported"): _per_day(
            EVENTS.c.verified_at, since, sa.func.count(EVENTS.c.object_key),
            sa.func.sum(EVENTS.c.size),
        ),
        ("purge_count", "bytes_purged"): _per_day(
            EVENTS.c.purged_at, since, sa.func.count(), sa.func.sum(EVENTS.c.bytes_freed)
        ),
        ("archive_count",): _per_day(
            ARCHIVES.c.created_at, since, sa.func.count(),
            join=ARCHIVES.join(MEMBERS, MEMBERS.c.archive_id == ARCHIVES.c.id),
        ),
    }  # fmt: skip
    counts: dict[date, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
    with engine.connect() as connection:
        for names, query in queries.items():
            for row in connection.execute(query):
                for name, value in zip(names, row[1:], strict=True):
                    counts[row.day][name] = int(value or 0)
    return [
        DailyStats(date=day, **values)
        for day, values in sorted(counts.items(), reverse=True)
        if day <= today
    ]
