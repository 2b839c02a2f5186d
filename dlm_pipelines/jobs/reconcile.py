"""The `reconcile` job, `reconcile_schedule` and the reconciliation asset checks.

`dlm_pipelines.reconciler` compares the catalog with S3, the local disks and the tape
tags and stores a report in the catalog. This module shows it where people look:

- asset checks: `raw_export` / `reconciled` per partition (objects missing or
  changed, sources gone, stuck events), `raw_export` / `reconciled_unowned` for the
  whole asset (objects no event owns, folders no event names: they have no
  partition yet), and `tape_archive` / `reconciled` per partition. The job reports
  an evaluation for every partition with findings (failed: ERROR with an alarm, else
  WARN) and a passing one where all findings were closed;
- the run's metadata: counts per kind, what was scanned, the first findings;
- the run fails when a finding is an alarm.
"""

import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetKey,
    DefaultScheduleStatus,
    Failure,
    JobDefinition,
    MetadataValue,
    MultiPartitionsDefinition,
    OpExecutionContext,
    PreviewWarning,
    ScheduleDefinition,
    TableColumn,
    TableRecord,
    TableSchema,
    asset_check,
    job,
    op,
)

from dlm_pipelines.catalog import Catalog
from dlm_pipelines.reconciler import (
    EXPORT_KINDS,
    TAPE_KINDS,
    UNOWNED_KINDS,
    Finding,
    Reconciler,
    Report,
    Severity,
)
from dlm_pipelines.resources import DataRoot, ObjectStore
from dlm_pipelines.settings import Settings

CHECK = "reconciled"
UNOWNED_CHECK = "reconciled_unowned"
RAW_EXPORT = AssetKey("raw_export")
TAPE_ARCHIVE = AssetKey("tape_archive")
FINDINGS_TABLE = TableSchema(
    columns=[
        TableColumn("kind", "string"),
        TableColumn("severity", "string"),
        TableColumn("ref_id", "string"),
        TableColumn("key", "string"),
        TableColumn("path", "string"),
        TableColumn("detail", "string"),
    ]
)


def _target(kind: str) -> AssetKey | None:
    """The asset whose partitioned check shows a kind (None: the whole-asset check)."""
    if kind in EXPORT_KINDS:
        return RAW_EXPORT
    if kind in TAPE_KINDS:
        return TAPE_ARCHIVE
    return None


def _result_parts(kinds: Counter[str], alarms: int) -> dict[str, Any]:
    failed = sum(kinds.values()) > 0
    return {
        "passed": not failed,
        "severity": AssetCheckSeverity.ERROR if alarms else AssetCheckSeverity.WARN,
        "metadata": {
            "findings": sum(kinds.values()),
            "alarms": alarms,
            "per kind": MetadataValue.json(dict(sorted(kinds.items()))),
        },
    }


def check_evaluations(
    report_id: int,
    opened: Sequence[tuple[str | None, str, str, int]],
    closed: Sequence[tuple[str | None, str]],
    valid_partition: Any,
) -> list[AssetCheckEvaluation]:
    """One evaluation per (asset, partition) with findings in this report, a passing one
    per (asset, partition) whose findings all closed, and the whole-asset check."""
    kinds: dict[tuple[AssetKey, str], Counter[str]] = defaultdict(Counter)
    alarms: Counter[tuple[AssetKey, str]] = Counter()
    unowned: Counter[str] = Counter()
    for partition, kind, severity, count in opened:
        target = _target(kind)
        if target is None or partition is None or not valid_partition(partition):
            unowned[kind] += count
            continue
        kinds[(target, partition)][kind] += count
        if severity == Severity.ALARM:
            alarms[(target, partition)] += count
    for partition, kind in closed:
        target = _target(kind)
        if target is not None and partition is not None and valid_partition(partition):
            kinds.setdefault((target, partition), Counter())
    description = f"reconciliation report {report_id} (GET /api/1/reconciliation)"
    evaluations = [
        AssetCheckEvaluation(
            asset_key=target,
            check_name=CHECK,
            partition=partition,
            description=description,
            **_result_parts(counts, alarms[(target, partition)]),
        )
        for (target, partition), counts in sorted(kinds.items(), key=lambda i: str(i[0]))
    ]
    unowned_alarms = 0  # objects no event owns and unannounced folders are warnings
    evaluations.append(
        AssetCheckEvaluation(
            asset_key=RAW_EXPORT,
            check_name=UNOWNED_CHECK,
            description=description,
            **_result_parts(unowned, unowned_alarms),
        )
    )
    return evaluations


def summarize(report: Report, seconds: float) -> dict[str, Any]:
    return {
        "report": report.report_id,
        "findings": sum(report.counts.values()),
        "alarms": report.alarms,
        "closed since the last report": report.closed,
        "per kind": MetadataValue.json(dict(sorted(report.counts.items()))),
        "scanned": MetadataValue.json(dict(sorted(report.scanned.items()))),
        "seconds": round(seconds, 3),
        "first findings": MetadataValue.table(
            records=[_record(f) for f in report.first], schema=FINDINGS_TABLE
        ),
    }


def _record(finding: Finding) -> TableRecord:
    return TableRecord(
        {
            "kind": finding.kind.value,
            "severity": finding.severity.value,
            "ref_id": finding.ref_id or "",
            "key": finding.key or "",
            "path": finding.path or "",
            "detail": finding.detail,
        }
    )


def build_reconciler(
    settings: Settings,
    catalog: Catalog,
    object_store: ObjectStore,
    data_root: DataRoot,
    run_id: str | None = None,
) -> Reconciler:
    return Reconciler(
        catalog=catalog,
        client=object_store.client,
        bucket=object_store.bucket,
        data_root=data_root.root,
        systems=list(settings.systems),
        grace=settings.reconcile_grace,
        archive_after=settings.reconcile_archive_after,
        run_id=run_id,
    )


def build_reconcile_job(
    settings: Settings, partitions_def: MultiPartitionsDefinition
) -> JobDefinition:
    @op(
        name="reconcile_stores",
        description="Compares the catalog with S3 (listing, HEAD where it cannot decide), "
        "the tape tags, the local disks and itself; stores the report in the catalog and "
        "evaluates the reconciliation asset checks. Alarms fail the run.",
        tags={"dlm/kind": "reconcile"},
    )
    def reconcile_stores(
        context: OpExecutionContext,
        catalog: Catalog,
        object_store: ObjectStore,
        data_root: DataRoot,
    ) -> None:
        started = time.monotonic()
        reconciler = build_reconciler(settings, catalog, object_store, data_root, context.run_id)
        report = reconciler.run()
        metadata = summarize(report, time.monotonic() - started)
        opened, closed = catalog.report_partitions(report.report_id)
        valid = _partition_check(partitions_def)
        for evaluation in check_evaluations(report.report_id, opened, closed, valid):
            # Part of this run (report_runless_asset_event keeps one runless evaluation
            # per check and partition). log_event takes evaluations; its hint lags.
            context.log_event(evaluation)  # type: ignore[arg-type]
        context.log.info(
            f"report {report.report_id}: {dict(report.counts) or 'no findings'}; "
            f"{report.closed} closed; scanned {dict(report.scanned)}"
        )
        # A run with alarms fails: alert_on_failed_runs (sensors/alerts.py) then posts
        # one reconciliation alert with the "alarms" below.
        if report.alarms:
            alarms = {
                f.ref_id or f.key or f.path or f.kind.value: f"{f.kind.value}: {f.detail}"
                for f in report.first
                if f.severity == Severity.ALARM
            }
            raise Failure(
                description=f"{report.alarms} alarm(s) in reconciliation report "
                f"{report.report_id}: "
                + "; ".join(
                    f"{f.kind} {f.ref_id or f.key or f.path}: {f.detail}"
                    for f in report.first
                    if f.severity == Severity.ALARM
                )[:4000],
                metadata={**metadata, "alarms": MetadataValue.json(alarms)},
            )
        context.add_output_metadata(metadata)

    @job(
        name="reconcile",
        description="Catalog, S3, local disks and tape agree, or a finding says where not "
        "(see reconcile_schedule, GET /api/1/reconciliation, dlm reconcile).",
        tags={"dlm/kind": "reconcile"},
    )
    def reconcile() -> None:
        reconcile_stores()

    return reconcile


def _partition_check(partitions_def: MultiPartitionsDefinition) -> Any:
    known: dict[str, bool] = {}

    def valid(partition: str) -> bool:
        if partition not in known:
            try:
                known[partition] = partitions_def.has_partition_key(partition)
            except Exception:  # a malformed key in an old row
                known[partition] = False
        return known[partition]

    return valid


def build_reconcile_schedule(
    settings: Settings, reconcile_job: JobDefinition
) -> ScheduleDefinition:
    return ScheduleDefinition(
        name="reconcile_schedule",
        job=reconcile_job,
        cron_schedule=settings.reconcile_cron,
        execution_timezone=settings.purge_timezone,
        default_status=DefaultScheduleStatus.RUNNING,
        description="Runs the reconcile job on DLM_RECONCILE_CRON (DLM_PURGE_TIMEZONE).",
    )


def _latest_result(
    catalog: Catalog, kinds: Iterable[str], partition: str | None
) -> AssetCheckResult:
    """The check as the latest report left it (what the job evaluated last)."""
    report = catalog.latest_report()
    if report is None or report.id is None:
        return AssetCheckResult(passed=True, metadata={"report": "none yet: run reconcile"})
    wanted = set(kinds)
    rows = [r for r in catalog.findings_of(report.id, partition) if r.kind in wanted]
    if partition is None:  # the whole-asset check: findings without a partition
        rows = [r for r in rows if r.kind in UNOWNED_KINDS]
    counts = Counter(r.kind for r in rows)
    alarms = sum(1 for r in rows if r.severity == Severity.ALARM)
    parts = _result_parts(counts, alarms)
    parts["metadata"]["report"] = report.id
    return AssetCheckResult(**parts)


def build_reconciliation_checks(
    partitions_def: MultiPartitionsDefinition,
) -> list[AssetChecksDefinition]:
    """The checks the reconcile job evaluates. Executing one by hand shows what the
    latest report found; a new report needs the reconcile job."""
    with warnings.catch_warnings():
        # Partitioned asset checks are a preview in Dagster 1.13; per-partition
        # findings are what the UI must show.
        warnings.simplefilter("ignore", PreviewWarning)
        return _checks(partitions_def)


def _checks(partitions_def: MultiPartitionsDefinition) -> list[AssetChecksDefinition]:

    @asset_check(
        asset=RAW_EXPORT,
        name=CHECK,
        partitions_def=partitions_def,
        description="The partition's exports match S3 and the local disk (no object "
        "missing or changed, no source gone, no event stuck), per the latest "
        "reconciliation (job reconcile).",
    )
    def raw_export_reconciled(
        context: AssetCheckExecutionContext, catalog: Catalog
    ) -> AssetCheckResult:
        return _latest_result(catalog, EXPORT_KINDS, context.partition_key)

    @asset_check(
        asset=RAW_EXPORT,
        name=UNOWNED_CHECK,
        description="Every object at a contract key has an event and every folder under "
        "the data root is named by one, per the latest reconciliation (job reconcile).",
    )
    def raw_export_unowned(catalog: Catalog) -> AssetCheckResult:
        return _latest_result(catalog, UNOWNED_KINDS, None)

    @asset_check(
        asset=TAPE_ARCHIVE,
        name=CHECK,
        partitions_def=partitions_def,
        description="Every export of the partition has its archive location: none "
        "overdue (DLM_RECONCILE_ARCHIVE_AFTER), none recovered from a tape tag only, per "
        "the latest reconciliation (job reconcile).",
    )
    def tape_archive_reconciled(
        context: AssetCheckExecutionContext, catalog: Catalog
    ) -> AssetCheckResult:
        return _latest_result(catalog, TAPE_KINDS, context.partition_key)

    return [raw_export_reconciled, raw_export_unowned, tape_archive_reconciled]
