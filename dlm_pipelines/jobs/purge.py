"""The `purge` job and `purge_schedule`: Dagster wiring of the purge engine (`purger.py`).

The op reads the disk, runs a `Purger`, records what it did as run metadata and as
observations on `raw_export`, and fails the run when the store no longer matches the
catalog for some event.
"""

import time
from collections import Counter, defaultdict
from typing import Any

from dagster import (
    AssetKey,
    AssetObservation,
    Config,
    DefaultScheduleStatus,
    Failure,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    ScheduleDefinition,
    TableColumn,
    TableRecord,
    TableSchema,
    job,
    op,
)
from pydantic import Field

from dlm_pipelines.catalog import Catalog, utcnow
from dlm_pipelines.dagster_runs import run_is_alive
from dlm_pipelines.purge_policy import NOT_OPTED_IN, DiskLevel, PurgePolicy
from dlm_pipelines.purger import PurgeOutcome, Purger, read_disk
from dlm_pipelines.resources import DataRoot, ObjectStore
from dlm_pipelines.settings import Settings

SKIPPED_SHOWN = 1000  # per-event skip reasons in the run metadata (counts are complete)
PURGED_TABLE = TableSchema(
    columns=[
        TableColumn("ref_id", "string"),
        TableColumn("system", "string"),
        TableColumn("path", "string"),
        TableColumn("bytes", "int"),
        TableColumn("why", "string"),
    ]
)


class PurgeConfig(Config):
    dry_run: bool = Field(
        default=False,
        description="Only list what would be deleted: nothing is deleted and the catalog "
        "is not changed. Defaults to DLM_PURGE_DRY_RUN.",
    )


def summarize(
    outcomes: list[PurgeOutcome],
    *,
    seconds: float,
    dry_run: bool,
    not_opted_in: dict[str, int],
    disk_before: DiskLevel,
    disk_after: DiskLevel,
    min_free_percent: float,
) -> dict[str, Any]:
    """The run's metadata: counts and bytes per system, skip reasons, alarms, the list."""
    purged = [o for o in outcomes if o.why is not None]
    per_system: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        counts = per_system[o.record.system]
        if o.why is not None:
            counts["purged"] += 1
            counts["bytes freed"] += o.bytes_freed
        elif o.skip is not None:
            counts["skipped"] += 1
        else:
            counts["alarms" if o.alarm is not None else "errors"] += 1
    reasons = Counter(o.skip.reason for o in outcomes if o.skip is not None)
    for system, count in not_opted_in.items():
        per_system[system]["skipped"] += count
        reasons[NOT_OPTED_IN] += count
    skipped = {o.record.ref_id: f"{o.skip.reason}: {o.skip.detail}" for o in outcomes if o.skip}
    shown = dict(list(skipped.items())[:SKIPPED_SHOWN])
    prefix = "would be " if dry_run else ""
    return {
        "dry run": dry_run,
        f"{prefix}purged": len(purged),
        f"bytes {prefix}freed": sum(o.bytes_freed for o in purged),
        "seconds": round(seconds, 3),
        "events/s": round(len(outcomes) / seconds, 1) if seconds > 0 else 0.0,
        "free space": f"{disk_before.free_percent:.1f}% before, {disk_after.free_percent:.1f}% "
        f"after (DLM_PURGE_MIN_FREE {min_free_percent:g}%)",
        "per system": MetadataValue.json({s: dict(c) for s, c in sorted(per_system.items())}),
        "skip reasons": MetadataValue.json(dict(reasons.most_common())),
        "alarms": MetadataValue.json({o.record.ref_id: o.alarm for o in outcomes if o.alarm}),
        "errors": MetadataValue.json({o.record.ref_id: o.error for o in outcomes if o.error}),
        f"{prefix}deleted": MetadataValue.table(
            records=[
                TableRecord(
                    {
                        "ref_id": o.record.ref_id,
                        "system": o.record.system,
                        "path": o.path,
                        "bytes": o.bytes_freed,
                        "why": str(o.why),
                    }
                )
                for o in purged
            ],
            schema=PURGED_TABLE,
        ),
        "skipped events": MetadataValue.json(shown),
        "skipped events shown": f"{len(shown)} of {len(skipped)} (counts above are complete)",
    }


def observations(outcomes: list[PurgeOutcome], run_id: str) -> list[AssetObservation]:
    """One observation per `raw_export` partition where a copy was purged or an alarm rose."""
    by_partition: dict[str, list[PurgeOutcome]] = defaultdict(list)
    for o in outcomes:
        if o.why is not None or o.alarm is not None:
            by_partition[o.record.partition_key].append(o)
    return [
        AssetObservation(
            asset_key=AssetKey("raw_export"),
            partition=partition_key,
            description="Local copies purged (the S3 copies were verified just before).",
            metadata={
                "purged": len([o for o in items if o.why is not None]),
                "bytes freed": sum(o.bytes_freed for o in items),
                "needs attention": MetadataValue.json(
                    {o.record.ref_id: o.alarm for o in items if o.alarm}
                ),
                "purge run": run_id,
            },
        )
        for partition_key, items in sorted(by_partition.items())
    ]


def build_purge_job(settings: Settings) -> JobDefinition:
    policy = PurgePolicy.from_settings(settings)
    concurrency = settings.purge_concurrency

    @op(
        name="purge_local_copies",
        description="Deletes the local copy of every event of DLM_PURGE_SYSTEMS whose "
        "lifespan passed (or, when the disk is short of DLM_PURGE_MIN_FREE, the oldest) "
        "once a fresh HEAD proves its verified S3 object. Mismatches fail the run.",
        tags={"dlm/kind": "purge"},
    )
    def purge_local_copies(
        context: OpExecutionContext,
        config: PurgeConfig,
        catalog: Catalog,
        object_store: ObjectStore,
        data_root: DataRoot,
    ) -> None:
        root = data_root.root
        if not root.is_dir():
            raise Failure(description=f"data root {root} does not exist; nothing to purge")
        disk_before = read_disk(root)
        context.log.info(
            f"systems {sorted(policy.systems) or 'none (DLM_PURGE_SYSTEMS is empty)'}, "
            f"lifespan {policy.lifespan}, {disk_before.free_percent:.1f}% free "
            f"(min {policy.min_free_percent:g}%), dry run {config.dry_run}"
        )
        purger = Purger(
            catalog=catalog,
            store=object_store,
            data_root=root,
            policy=policy,
            run_id=context.run_id,
            dry_run=config.dry_run,
            concurrency=concurrency,
            run_is_alive=lambda other: run_is_alive(context.instance, other),
            verify_content=settings.purge_verify_content,
        )
        started = time.monotonic()
        outcomes = purger.run(utcnow(), disk_before)
        seconds = time.monotonic() - started
        metadata = summarize(
            outcomes,
            seconds=seconds,
            dry_run=config.dry_run,
            not_opted_in=catalog.unpurged_counts(excluding=policy.systems),
            disk_before=disk_before,
            disk_after=disk_before if config.dry_run else read_disk(root),
            min_free_percent=policy.min_free_percent,
        )
        problems = {o.record.ref_id: o.alarm or o.error for o in outcomes if o.alarm or o.error}
        for o in outcomes:
            if o.alarm:
                context.log.error(f"ALARM {o.record.ref_id}: {o.alarm}; not deleted")
            elif o.error:
                context.log.error(f"{o.record.ref_id}: {o.error}")
        purged = [o for o in outcomes if o.why is not None]
        verb = "would delete" if config.dry_run else "deleted"
        context.log.info(
            f"{verb} {len(purged)} local cop(ies), {sum(o.bytes_freed for o in purged)} bytes; "
            f"{len(outcomes) - len(purged) - len(problems)} skipped, {len(problems)} problem(s)"
        )
        if not config.dry_run:
            for observation in observations(outcomes, context.run_id):
                context.log_event(observation)
        if problems:
            alarms = len([o for o in outcomes if o.alarm])
            state = "catalog unchanged: dry run" if config.dry_run else "now needs attention"
            raise Failure(
                description=f"{alarms} event(s) whose S3 object does not match the catalog "
                f"(not deleted; {state}) and {len(problems) - alarms} error(s): "
                + "; ".join(f"{ref_id}: {problem}" for ref_id, problem in problems.items()),
                metadata=metadata,
            )
        context.add_output_metadata(metadata)

    @job(
        name="purge",
        description="Deletes local raw data that is provably safe in S3 (see purge_schedule).",
        tags={"dlm/kind": "purge"},
        config={"ops": {"purge_local_copies": {"config": {"dry_run": settings.purge_dry_run}}}},
    )
    def purge() -> None:
        purge_local_copies()

    return purge


def build_purge_schedule(settings: Settings, purge_job: JobDefinition) -> ScheduleDefinition:
    return ScheduleDefinition(
        name="purge_schedule",
        job=purge_job,
        cron_schedule=settings.purge_cron,
        execution_timezone=settings.purge_timezone,
        default_status=DefaultScheduleStatus.RUNNING,
        description="Runs the purge job on DLM_PURGE_CRON (DLM_PURGE_TIMEZONE). Each run "
        "considers every event not purged yet, so a missed or late tick loses nothing.",
    )
