"""The purge engine: delete local copies that are provably safe in S3 (no Dagster here).

`purge_policy` decides from the catalog which events qualify. `Purger` then holds
them in the catalog (verified → purging: one compare-and-set per chunk, so an event
that a re-export claimed or re-verified meanwhile is skipped, and no export can claim
a held one), and for each, in a bounded thread pool: a fresh HEAD must show the
recorded size, sha256 and the store's ETag; the local copy must be inside its system
folder, cross no symlink, contain no other event's source, and equal the event's
manifest exactly (names, types, sizes, mtimes; with `verify_content` every file is
re-hashed too; no clock comparison: docs/design.md, "Custody"). Then it is renamed
into the system's trash folder, which the purge owns: one atomic step, recorded in
the catalog with the chunk's results in one transaction (the event is purged from
then on), and only then removed. A removal that fails or is killed is finished by
the next run from the trash. A mismatch with the store is an alarm: the event needs
attention. The Dagster op, job and schedule that run it are in `jobs/purge.py`.
"""

import bisect
import os
import shutil
import stat
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from dlm_pipelines.catalog import Catalog, EventRecord, EventStatus
from dlm_pipelines.events import TRASH_FOLDER, InvalidEvent, resolve_source, validate_local_path
from dlm_pipelines.manifest import FILE, Manifest, compare, scan
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
NO_MANIFEST = "no manifest recorded"
CONTAINS_OTHERS = "contains another event's source"
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


def trash_folder(data_root: Path, system: str) -> Path:
    return data_root / system / TRASH_FOLDER


def move_to_trash(source: Path, data_root: Path, record: EventRecord) -> Path:
    """One rename into the system's trash (same filesystem): atomic, never half done."""
    trash = trash_folder(data_root, record.system)
    trash.mkdir(exist_ok=True)
    target = trash / record.ref_id
    if os.path.lexists(target):
        raise FileExistsError(f"{target} exists already")
    os.rename(source, target)
    return target


def remove(path: Path) -> None:
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)  # the fd-based rmtree never follows a symlink inside
    else:
        path.unlink()


def files_size(manifest: Manifest) -> int:
    return sum(m.size for m in manifest.members if m.type == FILE)


@dataclass(frozen=True)
class PurgeOutcome:
    record: EventRecord
    why: Why | None = None  # set when deleted (or, in a dry run, when it would be)
    path: str = ""
    bytes_freed: int = 0
    trash: str | None = None  # where the copy was renamed to, until removed
    skip: Skip | None = None
    alarm: str | None = None  # the store does not match the catalog
    error: str | None = None


@dataclass(frozen=True)
class Chunk:
    skipped: list[PurgeOutcome]
    proving: list[Future[PurgeOutcome]]  # held events being proven and moved to the trash


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
    verify_content: bool = False  # DLM_PURGE_VERIFY_CONTENT: re-hash every file first
    # per system, the sorted local_paths of events not purged (read once per run)
    _paths: dict[str, list[str]] = field(default_factory=dict)

    def run(self, now: datetime, disk: DiskLevel) -> list[PurgeOutcome]:
        """Finish what earlier runs left in the trash; then purge every event that
        qualifies now: all whose lifespan passed, then, while the disk is short of free
        space, the oldest verified ones."""
        emptied = [] if self.dry_run else self.empty_trash()
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
        return emptied + skipped + done + young

    def empty_trash(self) -> list[PurgeOutcome]:
        """Remove what earlier runs moved to the trash but did not finish removing (a
        failed removal, a killed run). A copy there that no run recorded was moved only
        after its proof: it is recorded as purged now. Entries of no event stay."""
        outcomes: list[PurgeOutcome] = []
        for system in sorted(self.policy.systems):
            trash = trash_folder(self.data_root, system)
            if not trash.is_dir():
                continue
            names = sorted(os.listdir(trash))
            owners = {r.ref_id: r for r in self.catalog.get_many(names)}
            removed: list[str] = []
            for name in names:
                record, path = owners.get(name), trash / name
                if record is None:
                    continue
                try:
                    if record.purged_at is None:
                        freed = files_size(scan(path))
                        self.catalog.record_trashed(record.ref_id, str(path), freed)
                        outcomes.append(
                            PurgeOutcome(record, why=Why.TRASH, path=str(path), bytes_freed=freed)
                        )
                    remove(path)
                    removed.append(record.ref_id)
                except Exception as exc:  # stays recorded; the next run tries again
                    error = f"trash {path} not removed: {type(exc).__name__}: {exc}"
                    outcomes.append(PurgeOutcome(record, error=error))
            self.catalog.trash_emptied(removed)
        return outcomes

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
                    outcomes += self._finish_chunk(pool, previous)
                previous = current
            if previous is not None:
                outcomes += self._finish_chunk(pool, previous)
        return outcomes

    def _start_chunk(self, pool: ThreadPoolExecutor, records: list[EventRecord], why: Why) -> Chunk:
        """Hold the chunk's events with one compare-and-set; the pool proves and moves
        them to the trash."""
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
        manifests = self.catalog.manifests([r.ref_id for r in mine])
        for system in {r.system for r in mine} - set(self._paths):
            self._paths[system] = self.catalog.local_paths(system)
        return Chunk(
            skipped,
            [pool.submit(self._prove_and_trash, r, manifests.get(r.ref_id), why) for r in mine],
        )

    def _finish_chunk(self, pool: ThreadPoolExecutor, chunk: Chunk) -> list[PurgeOutcome]:
        """Wait for the chunk, end its holds in one transaction (the moved copies are
        purged from here on), then empty their trash."""
        done = [future.result() for future in chunk.proving]
        if self.dry_run:
            return chunk.skipped + done

        def differs(o: PurgeOutcome) -> bool:
            return o.skip is not None and o.skip.reason == CHANGED_LOCALLY

        self.catalog.finish_purges(
            self.run_id,
            purged=[(o.record, o.bytes_freed, o.trash) for o in done if o.why is not None],
            released=[
                o.record for o in done if o.why is None and o.alarm is None and not differs(o)
            ],
            kept=[
                (o.record, f"purge kept the local copy: not as exported: {o.skip.detail}")
                for o in done
                if o.skip is not None and differs(o)
            ],
            alarms=[(o.record, o.alarm) for o in done if o.alarm is not None],
        )
        trashed = [o for o in done if o.trash is not None]
        errors = list(pool.map(self._remove_trash, trashed))
        failed = {o.record.ref_id: e for o, e in zip(trashed, errors, strict=True) if e}
        self.catalog.trash_emptied(
            [o.record.ref_id for o in trashed if o.record.ref_id not in failed]
        )
        return chunk.skipped + [
            replace(o, error=failed[o.record.ref_id]) if o.record.ref_id in failed else o
            for o in done
        ]

    def _remove_trash(self, outcome: PurgeOutcome) -> str | None:
        assert outcome.trash is not None
        try:
            remove(Path(outcome.trash))
            return None
        except Exception as exc:  # recorded: the next run's empty_trash finishes it
            return f"moved to {outcome.trash}, removal failed: {type(exc).__name__}: {exc}"

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

    def _prove_and_trash(
        self, record: EventRecord, manifest: Manifest | None, why: Why
    ) -> PurgeOutcome:
        try:
            outcome = self._prove(record, manifest, why)
            if outcome.why is None or self.dry_run:
                return outcome
            trash = move_to_trash(Path(outcome.path), self.data_root, record)
            return PurgeOutcome(
                record,
                why=why,
                path=outcome.path,
                bytes_freed=outcome.bytes_freed,
                trash=str(trash),
            )
        except Exception as exc:  # one event's failure never stops the others
            return PurgeOutcome(record, error=f"{type(exc).__name__}: {exc}")

    def _contains_others(self, record: EventRecord) -> str | None:
        """Another catalogued event's local_path inside this one's, if any."""
        paths = self._paths.get(record.system) or self.catalog.local_paths(record.system)
        prefix = record.local_path.rstrip("/") + "/"
        i = bisect.bisect_left(paths, prefix)
        return paths[i] if i < len(paths) and paths[i].startswith(prefix) else None

    def _prove(self, record: EventRecord, manifest: Manifest | None, why: Why) -> PurgeOutcome:
        """What deleting would do, checked now: first S3, then the local copy against
        the manifest."""
        assert record.object_key and record.size is not None and record.sha256
        try:
            self.store.verify_object(
                record.object_key,
                size=record.size,
                sha256=record.sha256,
                ref_id=record.ref_id,
                etag=record.etag,  # the store's own checksum: copied metadata proves nothing
            )
        except VerificationError as exc:
            return PurgeOutcome(record, alarm=str(exc))
        if manifest is None:
            detail = "exported before manifests: run `dlm backfill-manifests`"
            return PurgeOutcome(record, skip=Skip(NO_MANIFEST, detail))
        try:
            source = local_source(self.data_root, record)
            local = scan(source, hash_files=self.verify_content)
        except FileNotFoundError as exc:
            return PurgeOutcome(record, skip=Skip(SOURCE_MISSING, str(exc)))
        except InvalidEvent as exc:
            return PurgeOutcome(record, skip=Skip(UNSAFE_SOURCE, str(exc)))
        inside = self._contains_others(record)
        if inside is not None:
            return PurgeOutcome(record, skip=Skip(CONTAINS_OTHERS, inside))
        difference = compare(manifest, local)
        if difference:
            return PurgeOutcome(record, skip=Skip(CHANGED_LOCALLY, difference.describe()))
        return PurgeOutcome(record, why=why, path=str(source), bytes_freed=files_size(local))
