"""`imaging_event_sensor`: Redis stream → catalog → one export run request per partition.

Delivery is at-least-once: the cursor (the last stream id read) is committed by
Dagster only after the run requests are stored, and everything downstream is
idempotent on ref_id.
"""

from collections import defaultdict
from datetime import timedelta

from dagster import (
    AssetKey,
    AssetObservation,
    AssetsDefinition,
    DefaultSensorStatus,
    MultiPartitionsDefinition,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from dlm_pipelines.catalog import Catalog, EventStatus, utcnow
from dlm_pipelines.dagster_runs import (
    RUNNING_STATUSES,
    WAITING_RUN_STATUSES,
    partition_has_run,
    run_is_alive,
)
from dlm_pipelines.events import ImagingEvent, InvalidEvent, parse_imaging_event
from dlm_pipelines.partitions import partition_key_for, system_of
from dlm_pipelines.resources import RedisStreams
from dlm_pipelines.settings import Settings

INITIAL_CURSOR = "0-0"
# Every raw_export run carries this tag (multi-partition runs get one per dimension).
SYSTEM_PARTITION_TAG = "dagster/partition/system"


def stream_id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def build_imaging_event_sensor(
    settings: Settings, raw_export: AssetsDefinition, partitions_def: MultiPartitionsDefinition
) -> SensorDefinition:
    systems = tuple(settings.systems)
    first_date = settings.partition_start_date.isoformat()
    sweep_after = timedelta(seconds=settings.sensor_sweep_after_seconds)
    stale_after = timedelta(seconds=settings.export_stale_after_seconds)

    @sensor(
        name="imaging_event_sensor",
        description="Reads new imaging events from Redis, records them in the catalog, "
        "dead-letters invalid ones and requests export runs per partition.",
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        asset_selection=[raw_export],
    )
    def imaging_event_sensor(
        context: SensorEvaluationContext, streams: RedisStreams, catalog: Catalog
    ) -> SensorResult:
        cursor = context.cursor or INITIAL_CURSOR
        observations = _trim_alarm(context, streams, cursor)
        entries = streams.read_imaging_events(cursor, settings.sensor_batch_size)

        accepted: list[tuple[ImagingEvent, str, str]] = []
        rejected = 0
        for stream_id, fields in entries:
            try:
                event = parse_imaging_event(fields, systems)
                if event.partition_date < first_date:
                    raise InvalidEvent(
                        f"timestamp: {event.timestamp.isoformat()} is before "
                        f"DLM_PARTITION_START_DATE ({first_date}); no partition holds it"
                    )
            except InvalidEvent as exc:
                streams.dead_letter(stream_id, fields, str(exc))
                context.log.warning(f"dead-lettered {stream_id}: {exc}")
                rejected += 1
                continue
            accepted.append((event, stream_id, partition_key_for(event)))

        new = catalog.record_events(accepted)
        duplicates = [event.ref_id for event, _, _ in accepted if event.ref_id not in new]
        if duplicates:
            context.log.info(f"{len(duplicates)} repeated ref_id(s), kept once: {duplicates[:10]}")

        # Group what still needs exporting by partition; the stream ids name the batch.
        statuses = {
            r.ref_id: r.status for r in catalog.get_many([e.ref_id for e, _, _ in accepted])
        }
        batches: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for event, stream_id, partition_key in accepted:
            if statuses.get(event.ref_id) == EventStatus.RECEIVED:
                batches[partition_key].append((event.ref_id, stream_id))

        run_requests: list[RunRequest] = []
        for partition_key, items in batches.items():
            if not partitions_def.has_partition_key(partition_key):
                continue  # a day that has not begun yet; the sweep picks it up later
            if partition_has_run(context.instance, partition_key, WAITING_RUN_STATUSES):
                continue  # the queued run takes every pending event when it starts
            ref_ids = list(dict.fromkeys(ref_id for ref_id, _ in items))
            run_requests.append(
                RunRequest(
                    partition_key=partition_key,
                    run_key=f"{partition_key}@{items[0][1]}..{items[-1][1]}",
                    run_config={"ops": {"raw_export": {"config": {"ref_ids": ref_ids}}}},
                    tags={"dlm/system": system_of(partition_key), "dlm/trigger": "sensor"},
                )
            )

        # The sweep: work nobody will do otherwise. Never-tried events whose run request
        # was lost (or whose day had not begun), and events claimed by a dead run.
        _fail_silent_runs(context, stale_after)
        requested = {r.partition_key for r in run_requests} | set(batches)
        orphaned = catalog.stale_partitions(utcnow() - sweep_after) + [
            partition_key
            for partition_key, run_id in catalog.claims()
            if not run_is_alive(context.instance, run_id)
        ]
        for partition_key in dict.fromkeys(orphaned):
            if partition_key in requested or not partitions_def.has_partition_key(partition_key):
                continue
            if partition_has_run(context.instance, partition_key, WAITING_RUN_STATUSES):
                continue
            requested.add(partition_key)
            context.log.warning(f"{partition_key}: events nobody is exporting; requesting a run")
            run_requests.append(
                RunRequest(
                    partition_key=partition_key,
                    tags={"dlm/system": system_of(partition_key), "dlm/trigger": "sweep"},
                )
            )

        new_cursor = entries[-1][0] if entries else cursor
        if entries:
            context.log.info(
                f"read {len(entries)} entr(ies) up to {new_cursor}: {len(new)} new, "
                f"{len(duplicates)} repeated, {rejected} dead-lettered; "
                f"{len(run_requests)} run request(s)"
            )
        return SensorResult(
            run_requests=run_requests,
            cursor=new_cursor,
            asset_events=observations,
            skip_reason=None if run_requests else _skip_reason(entries, rejected, duplicates),
        )

    return imaging_event_sensor


def _skip_reason(entries: list, rejected: int, duplicates: list[str]) -> str:
    if not entries:
        return "no new imaging events"
    return (
        f"{len(entries)} entr(ies) read, none needs a new run ({rejected} dead-lettered, "
        f"{len(duplicates)} repeated; others wait for a queued run)"
    )


def _fail_silent_runs(context: SensorEvaluationContext, stale_after: timedelta) -> None:
    """Mark export runs failed that logged nothing for `stale_after`.

    The default run launcher cannot tell that a run worker died (with its machine or
    its daemon); such a run stays STARTED forever, holds its events' claims and, through
    the per-system concurrency limit, blocks its system. raw_export logs a heartbeat,
    so silence means death.
    """
    now = utcnow().timestamp()
    for record in context.instance.get_run_records(filters=RunsFilter(statuses=RUNNING_STATUSES)):
        run = record.dagster_run
        if SYSTEM_PARTITION_TAG not in run.tags:
            continue
        latest = context.instance.get_records_for_run(run.run_id, limit=1, ascending=False)
        last_seen = (
            latest.records[0].timestamp if latest.records else record.create_timestamp.timestamp()
        )
        silent = now - last_seen
        if silent > stale_after.total_seconds():
            message = (
                f"no heartbeat for {silent:.0f} s (limit {stale_after.total_seconds():.0f} s): "
                "the run worker is presumed dead; its events will be exported by a new run"
            )
            context.log.error(f"run {run.run_id} ({run.tags.get('dagster/partition')}): {message}")
            context.instance.report_run_failed(run, message)


def _trim_alarm(
    context: SensorEvaluationContext, streams: RedisStreams, cursor: str
) -> list[AssetObservation]:
    """Say loudly if entries after the cursor were trimmed or deleted before we read them."""
    try:
        info = streams.client.xinfo_stream(streams.imaging_event_stream)
    except Exception:  # the stream does not exist yet
        return []
    deleted = info.get("max-deleted-entry-id") or INITIAL_CURSOR
    if stream_id_key(deleted) <= stream_id_key(cursor):
        return []
    message = (
        f"stream {streams.imaging_event_stream} lost entries after the cursor {cursor} "
        f"(deleted up to {deleted}) before they were read: those events were never seen"
    )
    context.log.error(message)
    return [
        AssetObservation(
            asset_key=AssetKey("raw_export"),
            metadata={"alarm": message, "cursor": cursor, "max_deleted_entry_id": deleted},
        )
    ]
