"""`archive_sensor`: tape-archive notifications on RabbitMQ → catalog → runless
materialisations of `tape_archive`.

A tick takes a batch with `basic_get`, dead-letters what cannot be parsed, commits
the rest to the catalog in one transaction and only then acks it. If the catalog
refuses the batch while it is reachable, the messages are recorded one at a time and
each one it refuses is dead-lettered alone (issue 11), so no poison message blocks
the queue. A tick cut short
(broker restart, crash) loses nothing: unacked messages are redelivered and recording
them again is a no-op. No cursor: the queue's acks are the cursor.
"""

import time
from collections import defaultdict
from dataclasses import dataclass, field

from dagster import (
    AssetMaterialization,
    DefaultSensorStatus,
    MetadataValue,
    MultiPartitionsDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from dlm_pipelines import alerts
from dlm_pipelines.archive_locations import (
    ArchiveMessage,
    InvalidArchiveMessage,
    parse_archive_message,
)
from dlm_pipelines.assets.archive_locations import TAPE_ARCHIVE
from dlm_pipelines.catalog import Catalog, RecordedJob
from dlm_pipelines.resources.alerts import Alerts
from dlm_pipelines.resources.archive_queue import (
    ArchiveInbox,
    ArchiveQueue,
    BrokerError,
    Delivery,
)
from dlm_pipelines.settings import Settings

# Stop taking messages after this long, well inside Dagster's 60 s sensor timeout.
TICK_BUDGET_SECONDS = 30.0


@dataclass
class Tick:
    jobs: list[RecordedJob] = field(default_factory=list)
    dead_lettered: int = 0
    dead_letter_reasons: list[str] = field(default_factory=list)
    stopped_by: str | None = None  # why the batch ended early

    @property
    def handled(self) -> int:
        return len(self.jobs) + self.dead_lettered

    def summary(self, queue: str) -> str:
        if not self.handled:
            return f"no archive notifications in {queue}"
        archives = [a for job in self.jobs for a in job.archives]
        matched = sum(len(refs) for a in archives for refs in a.by_partition.values())
        text = (
            f"{len(self.jobs)} archive job(s) recorded "
            f"({sum(not j.first_delivery for j in self.jobs)} already known), "
            f"{len(archives)} archive file(s), {matched} export(s) archived, "
            f"{sum(len(a.unmatched_keys) for a in archives)} unmatched key(s); "
            f"{self.dead_lettered} dead-lettered"
        )
        return text + (f"; stopped early: {self.stopped_by}" if self.stopped_by else "")


def build_archive_sensor(
    settings: Settings, partitions_def: MultiPartitionsDefinition
) -> SensorDefinition:
    batch_size = settings.archive_batch_size

    @sensor(
        name="archive_sensor",
        description="Reads the tape archiver's notifications from RabbitMQ, records archive "
        "files and their members in the catalog, dead-letters unreadable messages and "
        "materialises the tape_archive partitions whose exports were archived.",
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
    )
    def archive_sensor(
        context: SensorEvaluationContext,
        archive_queue: ArchiveQueue,
        catalog: Catalog,
        alert_webhook: Alerts,
    ) -> SensorResult | SkipReason:
        if not archive_queue.url:
            return SkipReason("DLM_RABBITMQ_URL is not set: archive notifications are not read")
        tick = Tick()
        try:
            with archive_queue.connect() as inbox:
                deadline = time.monotonic() + TICK_BUDGET_SECONDS
                taken: list[tuple[Delivery, ArchiveMessage]] = []
                for delivery in inbox.take(batch_size):
                    try:
                        taken.append((delivery, parse_archive_message(delivery.body)))
                    except Exception as exc:  # whatever the parser meets: this message only
                        reason = (
                            str(exc)
                            if isinstance(exc, InvalidArchiveMessage)
                            else f"could not be handled: {type(exc).__name__}: {exc}"
                        )
                        _dead_letter(context, inbox, tick, delivery, reason)
                    if time.monotonic() > deadline:
                        tick.stopped_by = f"tick budget of {TICK_BUDGET_SECONDS:.0f} s used"
                        break
                _record(context, catalog, inbox, tick, taken)
        except BrokerError as exc:
            if not tick.handled:
                return SkipReason(f"RabbitMQ unavailable, retrying next tick: {exc}")
            context.log.warning(f"{exc}; messages not acked stay queued for the next tick")
            tick.stopped_by = str(exc)
        if tick.dead_letter_reasons:  # one alert per tick, however many it dead-lettered
            alert_webhook.send(
                alerts.dead_letters(
                    source=archive_queue.queue,
                    destination=archive_queue.dead_letter_queue,
                    reasons=tick.dead_letter_reasons,
                )
            )
        return SensorResult(
            asset_events=materializations(context, tick.jobs, partitions_def),
            skip_reason=tick.summary(archive_queue.queue),
        )

    return archive_sensor


def _record(
    context: SensorEvaluationContext,
    catalog: Catalog,
    inbox: ArchiveInbox,
    tick: Tick,
    taken: list[tuple[Delivery, ArchiveMessage]],
) -> None:
    """Record and ack the parsed messages: one transaction for the batch; if the catalog
    refuses it while reachable, one per message, dead-lettering each it refuses.

    A catalog outage raises (from `ping`) with nothing acked: the messages come back.
    Each job is in `tick.jobs` before its ack, so a broker lost meanwhile is reported.
    """
    try:
        jobs = catalog.record_archive_messages([m for _, m in taken])
    except Exception as exc:  # the driver refuses some values (NUL) before PostgreSQL does
        catalog.ping()
        context.log.warning(f"the catalog refused the batch ({exc}); recording one at a time")
        for delivery, parsed in taken:
            try:
                (job,) = catalog.record_archive_messages([parsed])
            except Exception as refused:
                catalog.ping()
                reason = f"the catalog refused it: {type(refused).__name__}: {refused}"
                _dead_letter(context, inbox, tick, delivery, reason)
                continue
            _log_job(context, job, delivery.redelivered)
            tick.jobs.append(job)
            inbox.ack(delivery)
        return
    for (delivery, _), job in zip(taken, jobs, strict=True):
        _log_job(context, job, delivery.redelivered)
    tick.jobs.extend(jobs)
    for delivery, _ in taken:
        inbox.ack(delivery)


def _dead_letter(
    context: SensorEvaluationContext,
    inbox: ArchiveInbox,
    tick: Tick,
    delivery: Delivery,
    reason: str,
) -> None:
    # The reason travels in an AMQP header: no lone surrogates in it.
    reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
    inbox.dead_letter(delivery, reason)
    tick.dead_lettered += 1
    tick.dead_letter_reasons.append(reason)
    context.log.warning(f"dead-lettered to {inbox.dead_letter_queue}: {reason[:500]}")


def _log_job(context: SensorEvaluationContext, job: RecordedJob, redelivered: bool) -> None:
    again = " (redelivered)" if redelivered else ""
    known = "" if job.first_delivery else ", already in the catalog"
    # Debug: a busy queue gives hundreds per tick; the tick's summary says how many.
    context.log.debug(
        f"archive job {job.job_id} of {job.date}{again}{known}: "
        + (", ".join(f"{a.path} ({a.member_count})" for a in job.archives) or "nothing archived")
    )
    unmatched = job.unmatched_keys
    if unmatched:
        context.log.warning(
            f"archive job {job.job_id}: {len(unmatched)} key(s) match no export, kept as "
            f"unmatched members: {', '.join(unmatched[:10])}"
            + (" ..." if len(unmatched) > 10 else "")
        )


def materializations(
    context: SensorEvaluationContext,
    jobs: list[RecordedJob],
    partitions_def: MultiPartitionsDefinition,
) -> list[AssetMaterialization]:
    """One per partition whose exports were archived: which files, how many members."""
    events_by_file: dict[str, dict[str, int]] = defaultdict(dict)  # partition → path → events
    member_counts: dict[str, int] = {}
    job_ids: dict[str, set[str]] = defaultdict(set)
    for job in jobs:
        for archive in job.archives:
            member_counts[archive.path] = archive.member_count
            for partition_key, ref_ids in archive.by_partition.items():
                events_by_file[partition_key][archive.path] = len(ref_ids)
                job_ids[partition_key].add(job.job_id)

    out = []
    for partition_key, files in sorted(events_by_file.items()):
        if not partitions_def.has_partition_key(partition_key):
            context.log.warning(f"{partition_key} is not a partition of {TAPE_ARCHIVE}; skipped")
            continue
        paths = sorted(files)
        out.append(
            AssetMaterialization(
                asset_key=TAPE_ARCHIVE,
                partition=partition_key,
                description=f"{sum(files.values())} export(s) on tape in {len(paths)} file(s)",
                metadata={
                    "archive_files": MetadataValue.json(paths),
                    "member_counts": MetadataValue.json({p: member_counts[p] for p in paths}),
                    "events_archived": sum(files.values()),
                    "events_by_file": MetadataValue.json({p: files[p] for p in paths}),
                    "job_ids": MetadataValue.json(sorted(job_ids[partition_key])),
                },
            )
        )
    return out
