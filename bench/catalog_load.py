"""Filling a benchmark's catalog with a million rows in one statement."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from dlm_pipelines.catalog import get_engine, migrate


def bulk_load(url: str, statement: sa.TextClause, params: dict[str, Any]) -> None:
    """Migrate the catalog at `url`, run `statement` (an INSERT ... SELECT) without
    waiting for its WAL flush, then VACUUM ANALYZE, as a settled catalog would be."""
    migrate(url)
    with get_engine(url).begin() as conn:
        conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
        conn.execute(statement, params)
    vacuum(url)


def vacuum(url: str) -> None:
    with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE imaging_event"))
