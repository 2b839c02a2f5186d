"""`imaging_event_sensor`: Redis stream → catalog → one export run request per partition.

Delivery is at-least-once: the cursor (the last stream id read) is committed by
Dagster only after the run requests are stored, and everything downstream is
idempotent on ref_id.
"""

import gc
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from functools import cache

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

from dlm_pipelines import alerts
from dlm_pipelines.catalog import Catalog, EventStatus, utcnow
from dlm_pipelines.dagster_runs import (
    ACCEPTING_TAG,
    RUNNING_STATUSES,
    TakingNewEvents,
    alive_runs,
    run_is_alive,
)
from dlm_pipelines.events import TimeWindow
from dlm_pipelines.intake import Intake, IntakeReport
from dlm_pipelines.partitions import system_of
from dlm_pipelines.recovery import Recovery, RetrySchedule, SweepReport
from dlm_pipelines.resources import RedisStreams
from dlm_pipelines.resources.alerts import Alerts
from dlm_pipelines.resources.redis_streams import StreamEntry
from dlm_pipelines.settings import Settings
from dlm_pipelines.stream_retention import stream_id_key, trim_streams

INITIAL_CURSOR = "0-0"
ROUND_SECONDS = 0.05  # a tick's intake rounds, once it watches the stream
# Every raw_export run carries this tag (multi-partition runs get one per dimension).
SYSTEM_PARTITION_TAG = "dagster/partition/system"


def build_imaging_event_sensor(
    settings: Settings, raw_export: AssetsDefinition, partitions_def: MultiPartitionsDefinition
) -> SensorDefinition:
    systems = tuple(settings.systems)
    retries = RetrySchedule(
        backoff_seconds=settings.export_retry_backoff_seconds,
        max_backoff_seconds=settings.export_retry_backoff_max_seconds,
        max_runs=settings.export_max_attempts,
    )
    sweep_after = timedelta(seconds=settings.sensor_sweep_after_seconds)
    stale_after = timedelta(seconds=settings.export_stale_after_seconds)
    linger = settings.export_linger_seconds > 0

    @sensor(
        name="imaging_event_sensor",
        description="Reads new imaging events from Redis, records them in the catalog, "
        "dead-letters invalid ones and requests export runs per partition.",
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        asset_selection=[raw_export],
    )
    def imaging_event_sensor(
        context: SensorEvaluationContext,
        streams: RedisStreams,
        catalog: Catalog,
        alert_webhook: Alerts,
    ) -> SensorResult:
        _freeze_long_lived_objects()
        # The daemon starts a tick at most every 5 s: the stream is watched for most of
        # that time, so an event is recorded (where a warm run takes it) as it arrives.
        deadline = time.monotonic() + settings.sensor_wait_seconds
        committed = context.cursor or INITIAL_CURSOR
        now = utcnow()
        window = TimeWindow.around(settings.partition_start_date, now, settings.event_max_future)
        observations = _trim_alarm(context, streams, committed)
        intake = Intake(catalog=catalog, streams=streams, systems=systems)
        taking = TakingNewEvents(context.instance)
        counts = Counter[str]()

        def take(entries: list[StreamEntry]) -> dict[str, list[tuple[str, str]]]:
            """Record `entries`; their never-tried events by partition, as (ref_id, id)."""
            if not entries:
                return {}
            report = intake.take(entries, window)
            counts.update(
                read=len(entries),
                new=len(report.new),
                repeated=len(report.repeated),
                dead_lettered=report.dead_lettered,
            )
            _report_rejects(context, streams, alert_webhook, report, observations)
            _report_future(context, catalog, report, partitions_def)
            # New rows are never tried; only a repeated ref_id needs its status read.
            statuses = dict.fromkeys(report.new, EventStatus.RECEIVED.value) | catalog.statuses(
                report.repeated
            )
            batches: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for event, stream_id, partition_key in report.accepted:
                if statuses.get(event.ref_id) == EventStatus.RECEIVED:
                    batches[partition_key].append((event.ref_id, stream_id))
            return batches

        def requests_for(
            batches: dict[str, list[tuple[str, str]]], due: dict[str, list[str]]
        ) -> list[RunRequest]:
            run_requests = []
            for partition_key, items in batches.items():
                if not partitions_def.has_partition_key(partition_key):
                    continue  # a day that has not begun yet; the sweep picks it up later
                # A busy partition gets a request every tick: its due retries ride along
                # (a warm run takes only never-tried events; the request makes it yield).
                retry = due.get(partition_key, [])
                if partition_key in taking and not retry:
                    continue  # a queued run, or a warm one, takes every pending event
                ref_ids = list(dict.fromkeys([*(ref_id for ref_id, _ in items), *retry]))
                run_requests.append(
                    RunRequest(
                        partition_key=partition_key,
                        run_key=f"{partition_key}@{items[0][1]}..{items[-1][1]}",
                        run_config={"ops": {"raw_export": {"config": {"ref_ids": ref_ids}}}},
                        tags={
                            "dlm/system": system_of(partition_key),
                            "dlm/trigger": "sensor",
                            **({ACCEPTING_TAG: "true"} if linger else {}),
                        },
                    )
                )
            return run_requests

        entries = streams.read_imaging_events(committed, settings.sensor_batch_size)
        cursor = entries[-1][0] if entries else committed
        batches = take(entries)

        # Failed events due for a retry (and lost announcements): see recovery.py.
        recovery = Recovery(
            catalog=catalog,
            streams=streams,
            retries=retries,
            run_is_alive=lambda run_id: run_is_alive(context.instance, run_id),
        ).sweep(now)
        _log_recovery(context, recovery)
        run_requests = requests_for(batches, recovery.due)
        _fail_silent_runs(context, stale_after)
        run_requests += _sweep(
            context,
            catalog,
            recovery,
            set(batches),
            partitions_def,
            taking,
            since=now - sweep_after,
        )

        trimmed = trim_streams(
            streams.client,
            imaging_stream=streams.imaging_event_stream,
            other_streams=[streams.export_stream, streams.dead_letter_stream],
            cursor=committed,  # this tick's may yet be lost
            now=now,
            retention=settings.stream_retention,
        )
        if any(trimmed.values()):
            context.log.info(f"trimmed entries older than {settings.stream_retention}: {trimmed}")

        # Until the budget is spent, record each entry as it comes (a warm run of its
        # partition takes it from the catalog); return at once when a run is needed.
        while not run_requests and (remaining := deadline - time.monotonic()) > 0:
            if len(entries) < settings.sensor_batch_size:
                if not streams.wait_for_imaging_events(cursor, remaining):
                    break
                # Entries come one by one: gather a round's worth, so that each round's
                # catalog and run queries serve several events when they come fast.
                time.sleep(min(ROUND_SECONDS, max(0.0, deadline - time.monotonic())))
            entries = streams.read_imaging_events(cursor, settings.sensor_batch_size)
            cursor = entries[-1][0] if entries else cursor
            run_requests = requests_for(take(entries), {})

        if counts["read"]:
            context.log.info(
                f"read {counts['read']} entr(ies) up to {cursor}: {counts['new']} new, "
                f"{counts['repeated']} repeated, {counts['dead_lettered']} dead-lettered; "
                f"{len(run_requests)} run request(s)"
            )
        return SensorResult(
            run_requests=run_requests,
            cursor=cursor,
            asset_events=observations,
            skip_reason=None if run_requests else _skip_reason(counts),
        )

    return imaging_event_sensor


@cache
def _freeze_long_lived_objects() -> None:
    """At the first tick, move everything the process holds (Dagster, the loaded code
    location) out of the garbage collector's view, once: a tick of 5,000 entries
    allocates enough to trigger a full collection, which otherwise walks those ~300,000
    objects (0.3-0.5 s of a busy tick on the 2-core machine, bench/README.md)."""
    gc.freeze()


def _report_future(
    context: SensorEvaluationContext,
    catalog: Catalog,
    intake: IntakeReport,
    partitions_def: MultiPartitionsDefinition,
) -> None:
    """New events dated in a day that has not begun: say so in the run log and in the
    event's lifecycle; the sweep exports them once their partition exists."""
    # has_partition_key walks the daily partitions (~0.1 ms): once per key, not per event
    keys = {key for _, _, key in intake.accepted}
    begun = {key for key in keys if partitions_def.has_partition_key(key)}
    future = [
        event
        for event, _, key in intake.accepted
        if event.ref_id in intake.new and key not in begun
    ]
    for event in future:
        note = (
            f"dated {event.timestamp.isoformat()}, in the future: exported once its UTC day "
            f"({event.partition_date}) begins"
        )
        context.log.warning(f"{event.ref_id}: {note}")
        catalog.note([event.ref_id], note)


def _report_rejects(
    context: SensorEvaluationContext,
    streams: RedisStreams,
    alert_webhook: Alerts,
    intake: IntakeReport,
    observations: list[AssetObservation],
) -> None:
    for stream_id, reason in intake.reasons:
        context.log.warning(f"dead-lettered {stream_id}: {reason}")
    if not intake.reasons:
        return
    # Runless: the counts stay on raw_export's timeline in the UI.
    observations.append(
        AssetObservation(
            asset_key=AssetKey("raw_export"),
            metadata={
                "dead_lettered": intake.dead_lettered,
                "conflicts": intake.conflicts,
                "stream_ids": [stream_id for stream_id, _ in intake.reasons][:100],
            },
        )
    )
    # one alert per intake, however many entries it rejected
    alert_webhook.send(
        alerts.dead_letters(
            source=streams.imaging_event_stream,
            destination=streams.dead_letter_stream,
            reasons=[reason for _, reason in intake.reasons],
        )
    )


def _sweep(
    context: SensorEvaluationContext,
    catalog: Catalog,
    recovery: SweepReport,
    handled: set[str],
    partitions_def: MultiPartitionsDefinition,
    taking: TakingNewEvents,
    *,
    since: datetime,
) -> list[RunRequest]:
    """Work nobody will do otherwise: never-tried events whose run request was lost (or
    whose day had not begun), events claimed by a dead run, failed events due for a
    retry. One run request per such partition not `handled` by this tick already."""
    claims = catalog.claims()
    alive = alive_runs(context.instance, {run_id for _, run_id in claims})
    orphaned = (
        catalog.stale_partitions(since)
        + [partition_key for partition_key, run_id in claims if run_id not in alive]
        + list(recovery.due)
    )
    run_requests = []
    for partition_key in dict.fromkeys(orphaned):
        if partition_key in handled or not partitions_def.has_partition_key(partition_key):
            continue
        if partition_key in taking:
            continue
        retry = recovery.due.get(partition_key, [])
        context.log.warning(
            f"{partition_key}: events nobody is exporting; requesting a run"
            + (f" (retrying {len(retry)} failed event(s))" if retry else "")
        )
        run_requests.append(
            RunRequest(
                partition_key=partition_key,
                # Named failed events are retried; never-tried ones are always taken.
                run_config={"ops": {"raw_export": {"config": {"ref_ids": retry}}}} if retry else {},
                tags={"dlm/system": system_of(partition_key), "dlm/trigger": "sweep"},
            )
        )
    return run_requests


def _log_recovery(context: SensorEvaluationContext, report: SweepReport) -> None:
    for ref_id, reason in report.gave_up:
        context.log.error(f"{ref_id}: needs attention, {reason}")
    if report.announced:
        context.log.warning(
            f"announced {len(report.announced)} verified event(s) whose announcement was "
            f"lost: {report.announced[:10]}"
        )


def _skip_reason(counts: Counter[str]) -> str:
    if not counts["read"]:
        return "no new imaging events"
    return (
        f"{counts['read']} entr(ies) read, none needs a new run ({counts['dead_lettered']} "
        f"dead-lettered, {counts['repeated']} repeated; others wait for a queued or warm run)"
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
    deleted = streams.max_deleted_imaging_event_id() or INITIAL_CURSOR
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
