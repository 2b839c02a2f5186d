"""Query helpers over the catalog's tables (SQLAlchemy Core): the API selects columns,
not ORM objects, so a 500-row page costs one cheap row tuple per event."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from dlm_pipelines.catalog import ARCHIVES, EVENTS, FINDINGS, MANIFESTS, MEMBERS, REPORTS

__all__ = [
    "ARCHIVES",
    "EVENTS",
    "FINDINGS",
    "MANIFESTS",
    "MEMBERS",
    "REPORTS",
    "count_and_page",
    "utc_day",
]


def count_and_page(
    connection: sa.Connection,
    table: sa.Table,
    columns: Sequence[Any],
    *,
    where: Sequence[Any],
    order_by: Sequence[Any],
    limit: int,
    offset: int,
) -> tuple[int, list[Any]]:
    """What every listing answers: how many rows of `table` match `where` (all pages),
    and one page of `columns` in `order_by`."""
    count = connection.scalar(sa.select(sa.func.count()).select_from(table).where(*where))
    page = connection.execute(
        sa.select(*columns).where(*where).order_by(*order_by).limit(limit).offset(offset)
    )
    return count or 0, list(page.all())


class utc_day(FunctionElement[Any]):
    """The UTC calendar day of a timestamp column."""

    type = sa.Date()
    inherit_cache = True


@compiles(utc_day)
def _utc_day_sqlite(element: utc_day, compiler: Any, **kw: Any) -> str:
    return f"date({compiler.process(element.clauses, **kw)})"  # stored as UTC already


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element: utc_day, compiler: Any, **kw: Any) -> str:
    # date() would use the session's time zone
    return f"(({compiler.process(element.clauses, **kw)}) AT TIME ZONE 'UTC')::date"
