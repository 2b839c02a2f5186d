"""`GET /api/1/reconciliation`: the latest reconciliation report (job `reconcile` or
`dlm reconcile`), its counts per kind and its findings, paged.

Order: alarms first, then warnings, then info; by kind, then oldest finding first.
"""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine

from dlm_api.deps import ServicesDep
from dlm_api.schemas import OFFSET_MAX, FindingItem, ReconciliationReport
from dlm_api.tables import FINDINGS, REPORTS, count_and_page
from dlm_pipelines.reconciler import SEVERITY_RANK, Kind, Severity

router = APIRouter(tags=["reconciliation"])

NO_REPORT: dict[int | str, dict[str, Any]] = {
    404: {"description": "No reconciliation has finished yet."}
}
FINDING_COLUMNS = (
    FINDINGS.c.kind,
    FINDINGS.c.severity,
    FINDINGS.c.ref_id,
    FINDINGS.c.key,
    FINDINGS.c.path,
    FINDINGS.c.partition_key,
    FINDINGS.c.detail,
    FINDINGS.c.first_seen_at,
)


@router.get("/reconciliation", responses=NO_REPORT)
async def latest_reconciliation(
    services: ServicesDep,
    kind: Kind | None = None,
    severity: Severity | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=OFFSET_MAX)] = 0,
) -> ReconciliationReport:
    """Where the catalog, S3, the local disks and the tape disagree, as last found."""
    report = await run_in_threadpool(latest_report, services.engine, kind, severity, limit, offset)
    if report is None:
        raise HTTPException(404, detail="no reconciliation has finished yet")
    return report


def latest_report(
    engine: Engine, kind: Kind | None, severity: Severity | None, limit: int, offset: int
) -> ReconciliationReport | None:
    with engine.connect() as connection:
        report = connection.execute(
            sa.select(REPORTS)
            .where(REPORTS.c.ran_at.is_not(None))
            .order_by(REPORTS.c.id.desc())
            .limit(1)
        ).first()
        if report is None:
            return None
        where = [FINDINGS.c.last_report_id == report.id]
        if kind is not None:
            where.append(FINDINGS.c.kind == kind.value)
        if severity is not None:
            where.append(FINDINGS.c.severity == severity.value)
        rank = sa.case({s.value: n for s, n in SEVERITY_RANK.items()}, value=FINDINGS.c.severity)
        count, rows = count_and_page(
            connection,
            FINDINGS,
            FINDING_COLUMNS,
            where=where,
            order_by=(rank, FINDINGS.c.kind, FINDINGS.c.id),
            limit=limit,
            offset=offset,
        )
    return ReconciliationReport(
        report_id=report.id,
        started_at=report.started_at,
        ran_at=report.ran_at,
        counts=report.counts,
        scanned=report.scanned,
        closed=report.closed,
        count=count,
        findings=[FindingItem.model_validate(row._mapping) for row in rows],
    )
