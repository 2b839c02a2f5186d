"""The purge engine: delete local copies that are provably safe in S3 (no Dagster here).

`purge_policy` decides from the catalog which events qualify. `Purger` then holds
them in the catalog (verified → purging: one compare-and-set per chunk, so an event
that a re-export claimed or re-verified meanwhile is skipped, and no export can claim
a held one), and for each, in a bounded thread pool: a fresh HEAD must show the
recorded size and sha256, the local copy must be inside its system folder and
unchanged since the export; then it is deleted. The chunk's results are recorded in
one transaction. A mismatch with the store is an alarm: the event needs attention.
The Dagster op, job and schedule that run it are in `jobs/purge.py`.
"""

import os
import shutil
import stat
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dlm_pipelines.catalog import Catalog, EventRecord, EventStatus
from dlm_pipelines.events import InvalidEvent, resolve_source, validate_local_path
from dlm_pipelines.purge_policy import (
    DiskLevel,
    PurgePolicy,
    Skip,
    Why,
    plan_purge,
    take_for_pressure,
    too_young,
)
from dlm_pipelines.resources import ObjectStore
from dlm_pipelines.resources.object_store import VerificationError

# Skip reasons that only the disk or the catalog can tell at purge time.
OTHER_BUCKET = "exported to another bucket"
SOURCE_MISSING = "source missing"
UNSAFE_SOURCE = "unsafe source"
CHANGED_LOCALLY = "changed since export"
HELD = "held by another run"
CHUNK = 500  # events held at once: one claim and one closing transaction per chunk


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
            self.store.verify_object(
                record.object_key, size=record.size, sha256=record.sha256, ref_id=record.ref_id
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
