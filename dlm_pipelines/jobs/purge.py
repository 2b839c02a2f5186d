"""The `purge` job and `purge_schedule`: delete local copies that are provably safe in S3.

`dlm_pipelines.purge` decides from the catalog which events qualify. `Purger` then
holds them in the catalog (verified → purging: one compare-and-set per chunk, so an
event that a re-export claimed or re-verified meanwhile is skipped, and no export can
claim a held one), and for each, in a bounded thread pool: a fresh HEAD must show
the recorded size and sha256, the local copy must be inside its system folder and
unchanged since the export; then it is deleted. The chunk's results are recorded in
one transaction. A mismatch with the store is an alarm: the event needs attention
and the run fails.
"""

import os
import shutil
import stat
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
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

from dlm_pipelines.assets.raw_export import run_is_alive
from dlm_pipelines.catalog import Catalog, EventRecord, EventStatus, utcnow
from dlm_pipelines.events import InvalidEvent, resolve_source, validate_local_path
from dlm_pipelines.purge import (
    NOT_OPTED_IN,
    DiskLevel,
    PurgePolicy,
    Skip,
    Why,
    plan_purge,
    take_for_pressure,
    too_young,
)
from dlm_pipelines.resources import DataRoot, ObjectStore
from dlm_pipelines.resources.object_store import VerificationError
from dlm_pipelines.settings import Settings

# Skip reasons that only the disk or the catalog can tell at purge time.
OTHER_BUCKET = "exported to another bucket"
SOURCE_MISSING = "source missing"
UNSAFE_SOURCE = "unsafe source"
CHANGED_LOCALLY = "changed since export"
HELD = "held by another run"
CHUNK = 500  # events held at once: one claim and one closing transaction per chunk
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


def read_disk(path: Path) -> DiskLevel:
    usage = shutil.disk_usage(path)
    return DiskLevel(total=usage.total, free=usage.free)


def local_source(data_root: Path, record: EventRecord) -> Path:
    """The event's folder or file, inside `<data root>/<system>/` and not a symlink."""
    resolved = resolve_source(data_root, record.system, record.local_path)
    if (data_root / record.system / record.local_path).is_symlink():
        # Deleting the target could remove another event's data that is not exported.
        raise InvalidEvent(f"local_path: {record.local_path!r} is a symlink")
    return resolved


def _raise(error: OSError) -> None:
    raise error


def measure(source: Path) -> tuple[int, float]:
    """Bytes in the files under `source`, and the newest mtime of anything there.

    Symlinks are counted as links, never followed.
    """
    top = os.lstat(source)
    if not stat.S_ISDIR(top.st_mode):
        return top.st_size, top.st_mtime
    size, newest = 0, top.st_mtime
    for folder, dirs, files in os.walk(source, onerror=_raise):
        for name in dirs + files:
            entry = os.lstat(os.path.join(folder, name))
            newest = max(newest, entry.st_mtime)
            if not stat.S_ISDIR(entry.st_mode):
                size += entry.st_size
    return size, newest


def export_began(record: EventRecord) -> datetime:
    """When the export that made the object started reading the files.

    claimed_at is that export's claim, unless a later claim was given back
    (a refused forced re-export), which leaves it after uploaded_at.
    """
    times = [t for t in (record.claimed_at, record.uploaded_at) if t is not None]
    return min(times)


def delete(source: Path) -> None:
    if stat.S_ISDIR(os.lstat(source).st_mode):
        shutil.rmtree(source)  # the fd-based rmtree never follows a symlink inside
    else:
        source.unlink()


@dataclass(frozen=True)
class PurgeOutcome:
    record: EventRecord
    why: Why | None = None  # set when deleted (or, in a dry run, when it would be)
    path: str = ""
    bytes_freed: int = 0
    skip: Skip | None = None
    alarm: str | None = None  # the store does not match the catalog
    error: str | None = None


@dataclass(frozen=True)
class Chunk:
    skipped: list[PurgeOutcome]
    proving: list[Future[PurgeOutcome]]  # held events being proven and deleted


@dataclass
class Purger:
    catalog: Catalog
    store: ObjectStore
    data_root: Path
    policy: PurgePolicy
    run_id: str
    dry_run: bool = False
    concurrency: int = 16
    run_is_alive: Callable[[str], bool] = lambda _run_id: False

    def run(self, now: datetime, disk: DiskLevel) -> list[PurgeOutcome]:
        """Purge every event that qualifies now: all whose lifespan passed, then, while
        the disk is short of free space, the oldest verified ones."""
        plan = plan_purge(self.catalog.unpurged(self.policy.systems), self.policy, now, disk)
        skipped = [PurgeOutcome(record, skip=skip) for record, skip in plan.skipped]
        done = self.purge(plan.due, Why.LIFESPAN)
        short = plan.bytes_short - sum(o.bytes_freed for o in done)
        early = plan.early
        while short > 0 and early:
            batch = take_for_pressure(early, short)
            early = early[len(batch) :]
            freed = self.purge(batch, Why.DISK_PRESSURE)
            short -= sum(o.bytes_freed for o in freed)
            done += freed
        young = [PurgeOutcome(r, skip=too_young(r, self.policy)) for r in early]
        return skipped + done + young

    def purge(self, records: list[EventRecord], why: Why) -> list[PurgeOutcome]:
        """Chunk by chunk: while the pool proves and deletes one chunk, this thread
        claims the next and then records the first, so the pool never waits on the
        catalog."""
        outcomes: list[PurgeOutcome] = []
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="purge") as pool:
            previous: Chunk | None = None
            for start in range(0, len(records), CHUNK):
                current = self._start_chunk(pool, records[start : start + CHUNK], why)
                if previous is not None:
                    outcomes += self._finish_chunk(previous)
                previous = current
            if previous is not None:
                outcomes += self._finish_chunk(previous)
        return outcomes

    def _start_chunk(self, pool: ThreadPoolExecutor, records: list[EventRecord], why: Why) -> Chunk:
        """Hold the chunk's events with one compare-and-set; the pool proves and deletes."""
        looked = [self._first_look(r) for r in records]  # an lstat each: not worth a thread
        skipped = [o for o in looked if o is not None]
        candidates = [r for r, o in zip(records, looked, strict=True) if o is None]
        if self.dry_run:
            held = {r.ref_id for r in candidates}
        else:
            held = self.catalog.claim_for_purge(candidates, self.run_id)
        changed = Skip(HELD, "changed since read: an export claimed it or verified anew")
        skipped += [PurgeOutcome(r, skip=changed) for r in candidates if r.ref_id not in held]
        mine = [r for r in candidates if r.ref_id in held]
        return Chunk(skipped, [pool.submit(self._prove_and_delete, r, why) for r in mine])

    def _finish_chunk(self, chunk: Chunk) -> list[PurgeOutcome]:
        """Wait for the chunk, then end its holds in one transaction."""
        done = [future.result() for future in chunk.proving]
        if not self.dry_run:
            self.catalog.finish_purges(
                self.run_id,
                purged=[(o.record, o.bytes_freed) for o in done if o.why is not None],
                released=[o.record for o in done if o.why is None and o.alarm is None],
                alarms=[(o.record, o.alarm) for o in done if o.alarm is not None],
            )
        return chunk.skipped + done

    def _first_look(self, record: EventRecord) -> PurgeOutcome | None:
        """A skip found without S3 or a claim (elsewhere, held, unsafe, gone); else None."""
        if record.bucket != self.store.bucket:
            return PurgeOutcome(record, skip=Skip(OTHER_BUCKET, f"{record.bucket}"))
        if record.status == EventStatus.PURGING:
            if record.run_id is not None and self.run_is_alive(record.run_id):
                return PurgeOutcome(record, skip=Skip(HELD, f"purge run {record.run_id}"))
            return None  # a dead run's hold: take it over, so that it ends either way
        # Cheap checks only (one lstat); `_prove` resolves the path fully before deleting.
        try:
            validate_local_path(record.local_path)
        except InvalidEvent as exc:
            return PurgeOutcome(record, skip=Skip(UNSAFE_SOURCE, str(exc)))
        named = self.data_root / record.system / record.local_path
        if not os.path.lexists(named):
            return PurgeOutcome(record, skip=Skip(SOURCE_MISSING, f"{named} does not exist"))
        return None

    def _prove_and_delete(self, record: EventRecord, why: Why) -> PurgeOutcome:
        try:
            outcome = self._prove(record, why)
            if outcome.why is not None and not self.dry_run:
                delete(Path(outcome.path))
            return outcome
        except Exception as exc:  # one event's failure never stops the others
            return PurgeOutcome(record, error=f"{type(exc).__name__}: {exc}")

    def _prove(self, record: EventRecord, why: Why) -> PurgeOutcome:
        """What deleting would do, checked now: first S3, then the local copy."""
        assert record.object_key and record.size is not None and record.sha256
        try:
            self.store.verify(
                record.object_key,
                size=record.size,
                sha256=record.sha256,
                ref_id=record.ref_id,
                etag=record.etag,  # the store's own checksum: copied metadata proves nothing
            )
        except VerificationError as exc:
            return PurgeOutcome(record, alarm=str(exc))
        try:
            source = local_source(self.data_root, record)
            size, newest = measure(source)
        except FileNotFoundError as exc:
            return PurgeOutcome(record, skip=Skip(SOURCE_MISSING, str(exc)))
        except InvalidEvent as exc:
            return PurgeOutcome(record, skip=Skip(UNSAFE_SOURCE, str(exc)))
        began = export_began(record)
        if newest > began.timestamp():
            modified = datetime.fromtimestamp(newest, UTC).isoformat()
            detail = f"modified {modified}, export began {began.isoformat()}"
            return PurgeOutcome(record, skip=Skip(CHANGED_LOCALLY, detail))
        return PurgeOutcome(record, why=why, path=str(source), bytes_freed=size)


# --- Dagster ------------------------------------------------------------------------------


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
