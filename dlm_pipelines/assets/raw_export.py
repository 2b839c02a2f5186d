"""The `raw_export` asset: one partition (UTC day × system) of verified tars in S3."""

import time
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    Backoff,
    Config,
    Failure,
    Jitter,
    MaterializeResult,
    MetadataValue,
    MultiPartitionsDefinition,
    RetryPolicy,
    RunsFilter,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)
from pydantic import Field

from dlm_pipelines.catalog import Catalog, EventRecord, EventStatus
from dlm_pipelines.dagster_runs import (
    ACCEPTING_TAG,
    STOP_GRACE_SECONDS,
    WAITING_RUN_STATUSES,
    run_is_alive,
    stop_accepting,
)
from dlm_pipelines.exporter import Exporter, ExportOutcome, Linger, Progress, export_partition
from dlm_pipelines.resources import DataRoot, ObjectStore, RedisStreams
from dlm_pipelines.settings import Settings

EXPORT_TABLE_SCHEMA = TableSchema(
    columns=[
        TableColumn("ref_id", "string"),
        TableColumn("key", "string"),
        TableColumn("size", "int"),
        TableColumn("sha256", "string"),
        TableColumn("seconds", "float"),
        TableColumn("MiB/s", "float"),  # this event's upload throughput
    ]
)


class ExportConfig(Config):
    ref_ids: list[str] = Field(
        default_factory=list,
        description="Events to export (the sensor fills this). Empty: every unverified "
        "event of the partition.",
    )
    force: bool = Field(
        default=False,
        description="Re-upload events that are already verified, if their local data exists.",
    )


def select_events(
    catalog: Catalog, partition_key: str, config: ExportConfig, run_id: str
) -> tuple[list[EventRecord], list[str]]:
    """What this run works on, and the requested ref_ids the catalog does not know.

    Named ref_ids plus every never-tried event of the partition (so one run drains a
    burst), plus this run's own failures on a step retry. Without names: every
    unverified event; `force` adds the verified ones.
    """
    if config.ref_ids:
        named = {r.ref_id: r for r in catalog.get_many(config.ref_ids)}
        unknown = [ref_id for ref_id in config.ref_ids if ref_id not in named]
        pending = catalog.in_partition(partition_key, [EventStatus.RECEIVED, EventStatus.FAILED])
        mine = [r for r in pending if r.status == EventStatus.RECEIVED or r.run_id == run_id]
        by_id = {**named, **{r.ref_id: r for r in mine}}
        return sorted(by_id.values(), key=lambda r: (r.timestamp, r.ref_id)), unknown
    records = catalog.in_partition(partition_key, list(EventStatus))
    # Without force, a verified event is only looked at if it was never announced
    # (a crash between verification and XADD): the exporter announces it.
    if not config.force:
        records = [r for r in records if r.status != EventStatus.VERIFIED or r.announced_at is None]
    return records, []


def _lingers(context: AssetExecutionContext, settings: Settings) -> bool:
    """Only a run the sensor started warm, on its first attempt (not a step retry)."""
    return (
        settings.export_linger_seconds > 0
        and context.run.tags.get(ACCEPTING_TAG) == "true"
        and context.retry_number == 0
    )


def _linger(context: AssetExecutionContext, settings: Settings) -> Linger:
    instance, run = context.instance, context.run
    system = run.tags.get("dagster/partition/system")

    def others_waiting() -> bool:
        """Another export run of this system queues behind us (concurrency limit 1)."""
        waiting = instance.get_run_records(
            filters=RunsFilter(
                statuses=WAITING_RUN_STATUSES, tags={"dagster/partition/system": str(system)}
            ),
            limit=1,
        )
        return bool(waiting)

    def stop() -> None:
        stop_accepting(instance, run.run_id)
        context.log.info("no longer taking new events of the partition")

    return Linger(
        idle_seconds=settings.export_linger_seconds,
        max_seconds=settings.export_max_run_seconds,
        stop_accepting=stop,
        others_waiting=others_waiting,
        grace_seconds=STOP_GRACE_SECONDS,
    )


def _summary(outcomes: list[ExportOutcome], seconds: float) -> dict[str, Any]:
    exported = [o for o in outcomes if o.exported]
    total = sum(o.size for o in exported)
    return {
        "events": len(exported),
        "bytes": total,
        "seconds": round(seconds, 3),
        "MB/s": round(total / 1e6 / seconds, 2) if seconds > 0 else 0.0,
        "skipped": len([o for o in outcomes if o.skipped]),
        "failed": len([o for o in outcomes if o.error]),
        "exports": MetadataValue.table(
            records=[
                TableRecord(
                    {
                        "ref_id": o.ref_id,
                        "key": o.key or "",
                        "size": o.size,
                        "sha256": o.sha256 or "",
                        "seconds": round(o.seconds, 3),
                        "MiB/s": round(o.size / 2**20 / o.seconds, 2) if o.seconds > 0 else 0.0,
                    }
                )
                for o in exported
            ],
            schema=EXPORT_TABLE_SCHEMA,
        ),
        "skip reasons": MetadataValue.json({o.ref_id: o.skipped for o in outcomes if o.skipped}),
    }


def build_raw_export(
    partitions_def: MultiPartitionsDefinition, settings: Settings
) -> AssetsDefinition:
    concurrency = settings.export_concurrency
    heartbeat_seconds = settings.export_heartbeat_seconds

    @asset(
        name="raw_export",
        partitions_def=partitions_def,
        group_name="export",
        kinds={"s3"},
        description="Raw imaging data as verified tars in S3, one partition per UTC day "
        "and system. Each event is tarred with metadata.json, streamed to S3, checked "
        "by size and sha256, and announced on the export stream.",
        retry_policy=RetryPolicy(
            max_retries=settings.export_max_retries,
            delay=settings.export_retry_delay_seconds,
            backoff=Backoff.EXPONENTIAL,
            jitter=Jitter.PLUS_MINUS,
        ),
        op_tags={"dlm/kind": "export"},
    )
    def raw_export(
        context: AssetExecutionContext,
        config: ExportConfig,
        catalog: Catalog,
        object_store: ObjectStore,
        streams: RedisStreams,
        data_root: DataRoot,
    ) -> MaterializeResult:
        partition_key = context.partition_key
        run_id = context.run_id
        if context.retry_number > 0 and context.run.tags.get(ACCEPTING_TAG) == "true":
            # An earlier attempt failed while it accepted: new events need their own run.
            stop_accepting(context.instance, run_id)
        records, unknown = select_events(catalog, partition_key, config, run_id)
        context.log.info(
            f"{len(records)} event(s) to consider in {partition_key} "
            f"(attempt {context.retry_number + 1}, force={config.force})"
        )
        exporter = Exporter(
            catalog=catalog,
            store=object_store,
            streams=streams,
            data_root=data_root,
            run_id=run_id,
            run_is_alive=lambda other: run_is_alive(context.instance, other),
            progress=(progress := Progress()),
        )
        started = time.monotonic()
        outcomes = export_partition(
            exporter,
            partition_key,
            records,
            force=config.force,
            concurrency=concurrency,
            heartbeat_seconds=heartbeat_seconds,
            # The log doubles as a heartbeat: the sensor fails export runs that stay
            # silent too long (a run worker that died with its machine or daemon).
            on_heartbeat=lambda accepting: context.log.info(
                f"heartbeat: {progress.describe()}"
                + ("; taking new events of the partition" if accepting else "")
            ),
            linger=_linger(context, settings) if _lingers(context, settings) else None,
        )
        seconds = time.monotonic() - started

        for o in outcomes:
            if o.exported:
                context.log.info(f"{o.ref_id}: {o.size} bytes → {o.key} sha256={o.sha256}")
            elif o.error:
                context.log.error(f"{o.ref_id}: {o.error}")
            else:
                context.log.info(f"{o.ref_id}: skipped ({o.skipped})")

        metadata = _summary(outcomes, seconds)
        failures = {o.ref_id: o.error for o in outcomes if o.error}
        failures.update({ref_id: "not in the catalog" for ref_id in unknown})
        if failures:
            retryable = [o for o in outcomes if o.error and not o.permanent]
            raise Failure(
                description=f"{len(failures)} of {len(records) + len(unknown)} event(s) failed: "
                + "; ".join(f"{ref_id}: {error}" for ref_id, error in failures.items()),
                metadata={**metadata, "failures": MetadataValue.json(failures)},
                allow_retries=bool(retryable),
            )
        return MaterializeResult(metadata=metadata)

    return raw_export
