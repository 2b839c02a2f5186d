"""Export catalogued events: `Exporter` does one (claim → key → stream tar to S3 →
verify → announce), `export_partition` a run's worth, side by side, and keeps a warm
run taking its partition's new events.

Used by the `raw_export` asset; free of Dagster so that its steps read in order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlm_pipelines.catalog import Catalog, EventRecord, EventStatus
from dlm_pipelines.events import EventMetadata, EventType, ImagingEvent, InvalidEvent
from dlm_pipelines.manifest import Manifest, compare, scan
from dlm_pipelines.resources import DataRoot, ObjectStore, RedisStreams
from dlm_pipelines.resources.object_store import KeyTaken
from dlm_pipelines.tar_stream import UploadResult


@dataclass(frozen=True)
class ExportOutcome:
    ref_id: str
    exported: bool = False
    key: str | None = None
    size: int = 0
    sha256: str | None = None
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was done (not an error)
    error: str | None = None
    permanent: bool = False  # retrying cannot help (unsafe path)


def event_from_record(record: EventRecord) -> ImagingEvent:
    return ImagingEvent(
        ref_id=record.ref_id,
        experiment_id=record.experiment_id,
        timestamp=record.timestamp,
        type=EventType(record.event_type),
        system=record.system,
        local_path=record.local_path,
        img_count=record.img_count,
        metadata=EventMetadata.model_validate(record.event_metadata),
    )


class Progress:
    """What a run's exports have done so far, for its heartbeat (thread-safe)."""

    def __init__(self, total_events: int = 0) -> None:
        self.total_events = total_events
        self.events_done = 0
        self.bytes_sent = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def taken(self, events: int) -> None:
        """A warm run took more events of its partition."""
        with self._lock:
            self.total_events += events

    def sent(self, size: int) -> None:
        with self._lock:
            self.bytes_sent += size

    def finished(self) -> None:
        with self._lock:
            self.events_done += 1

    def describe(self) -> str:
        seconds = time.monotonic() - self.started
        mib = self.bytes_sent / 2**20
        rate = mib / seconds if seconds > 0 else 0.0
        return (
            f"{self.events_done} of {self.total_events} event(s) done, "
            f"{mib:,.1f} MiB sent in {seconds:.0f} s ({rate:.1f} MiB/s)"
        )


@dataclass
class Exporter:
    catalog: Catalog
    store: ObjectStore
    streams: RedisStreams
    data_root: DataRoot
    run_id: str
    run_is_alive: Callable[[str], bool]
    progress: Progress | None = None

    def export(self, record: EventRecord, *, force: bool) -> ExportOutcome:
        try:
            return self._export(record, force=force)
        finally:
            if self.progress is not None:
                self.progress.finished()

    def _export(self, record: EventRecord, *, force: bool) -> ExportOutcome:
        ref_id = record.ref_id
        if record.status == EventStatus.VERIFIED and not force:
            if record.announced_at is None:
                announce(self.catalog, self.streams, record)
            return ExportOutcome(ref_id, key=record.object_key, skipped="already verified")
        if record.status == EventStatus.VERIFIED:
            # force: only re-upload what still exists locally; the S3 copy stays otherwise.
            try:
                self.data_root.source(record.system, record.local_path)
            except (FileNotFoundError, InvalidEvent) as exc:
                return ExportOutcome(
                    ref_id, key=record.object_key, skipped=f"not re-exported: {exc}"
                )

        if not self.catalog.claim(ref_id, self.run_id, force=force, run_is_alive=self.run_is_alive):
            return ExportOutcome(ref_id, skipped="claimed by another live run, or already verified")
        try:
            event = event_from_record(record)
            source = self.data_root.source(event.system, event.local_path)
            # Only an event that has had a key can have been exported (and have a manifest).
            recorded = self.catalog.manifest(ref_id) if record.object_key else None
            if recorded is not None:
                # It was exported once: the object may only get better (docs/design.md).
                unchanged = self._unchanged(record, source, recorded.manifest())
                refusal = None if unchanged else self._refusal(record, source, recorded.manifest())
                if unchanged or refusal:
                    self.catalog.release(ref_id, self.run_id, record.status)
                if unchanged:
                    return ExportOutcome(ref_id, key=record.object_key, skipped=unchanged)
                if refusal:
                    return ExportOutcome(
                        ref_id, key=record.object_key, error=refusal, permanent=True
                    )
            recorded_key = record.object_key if record.bucket == self.store.bucket else None
            key, condition = self._choose_key(event, recorded_key, look=False)
            if record.attempts:  # only an earlier attempt can have left parts behind
                self.store.abort_incomplete_uploads(key)
            try:
                result = self._upload(event, source, key, condition)
            except KeyTaken:
                if condition != FREE_KEY:
                    raise
                # Not free after all (an object from elsewhere): choose by looking.
                key, condition = self._choose_key(event, key)
                result = self._upload(event, source, key, condition)
            etag = self.store.verify_object(
                key, size=result.size, sha256=result.sha256, ref_id=ref_id
            )
            uploaded_at = self.catalog.mark_verified(
                ref_id,
                self.run_id,
                size=result.size,
                sha256=result.sha256,
                etag=etag,
                manifest=result.manifest,
            )
        except InvalidEvent as exc:
            return self._failed(ref_id, f"unsafe source: {exc}", permanent=True)
        except Exception as exc:
            return self._failed(ref_id, f"{type(exc).__name__}: {exc}")
        if uploaded_at is None:
            return self._failed(ref_id, "claim lost while uploading (taken over by another run)")
        self.streams.announce_export(
            ref_id=ref_id,
            sha256=result.sha256,
            size=result.size,
            key=f"{self.store.bucket}/{key}",
            uploaded_at=uploaded_at,
        )
        self.catalog.mark_announced(ref_id)
        return ExportOutcome(
            ref_id,
            exported=True,
            key=key,
            size=result.size,
            sha256=result.sha256,
            seconds=result.seconds,
        )

    def _unchanged(self, record: EventRecord, source: Path, manifest: Manifest) -> str | None:
        """Why no upload is needed: a verified object of exactly this tree (the tar is
        deterministic, so it would be the same bytes). None if one is."""
        if record.status != EventStatus.VERIFIED or compare(manifest, scan(source)):
            return None
        assert record.object_key and record.size is not None and record.sha256
        try:
            self.store.verify_object(
                record.object_key,
                size=record.size,
                sha256=record.sha256,
                ref_id=record.ref_id,
                etag=record.etag,
            )
        except Exception:  # the object is not what was recorded: repair it
            return None
        return "unchanged since export: the object already holds exactly this tree"

    def _refusal(self, record: EventRecord, source: Path, manifest: Manifest) -> str | None:
        """Why the object must not be replaced by a tar of `source`; None if it may."""
        if record.archive_path:
            return f"not replaced: the object is on tape ({record.archive_path})"
        if record.object_key and self.store.is_archived(record.object_key):
            return "not replaced: the object is tagged archived=true (on tape)"
        difference = compare(manifest, scan(source), allow_added=True)
        if difference:
            return (
                "not replaced: the local tree lacks or changed what the exported tar holds: "
                + difference.describe()
            )
        return None

    def _failed(self, ref_id: str, error: str, permanent: bool = False) -> ExportOutcome:
        self.catalog.mark_failed(ref_id, self.run_id, error)
        return ExportOutcome(ref_id, error=error, permanent=permanent)

    def _upload(
        self, event: ImagingEvent, source: Path, key: str, condition: dict[str, str]
    ) -> UploadResult:
        return self.store.upload_tar(
            source=source,
            metadata=event.tar_metadata(),
            key=key,
            ref_id=event.ref_id,
            condition=condition,
            on_progress=self.progress.sent if self.progress else None,
        )

    def _choose_key(
        self, event: ImagingEvent, recorded_key: str | None, *, look: bool = True
    ) -> tuple[str, dict[str, str]]:
        """The contract key, or its collision-free variant if another object holds it;
        and the condition of the write: create the key only if it is free, or replace
        only the object a HEAD saw (ours).

        Never overwrites another event's object: the catalog's unique (bucket, key)
        guards against concurrent DLM exports, the conditional write against objects
        from elsewhere. A first choice (`look=False`, no key recorded) needs no HEAD:
        the write fails if the key is taken, and the caller then looks.
        """
        if recorded_key:
            head = self.store.head(recorded_key)
            if head is None or self.store.ref_id_of(head) == event.ref_id:
                return recorded_key, _write_condition(head)
            # Another object took the key after an earlier attempt: never replace it.
        elif not look and self.catalog.assign_key(
            event.ref_id, self.store.bucket, event.object_key, collision=False
        ):
            return event.object_key, FREE_KEY
        for key, collision in ((event.object_key, False), (event.collision_free_key, True)):
            head = self.store.head(key)
            if head is not None and self.store.ref_id_of(head) != event.ref_id:
                continue
            if self.catalog.assign_key(event.ref_id, self.store.bucket, key, collision=collision):
                return key, _write_condition(head)
        raise RuntimeError(
            f"both {event.object_key} and {event.collision_free_key} are held by other objects"
        )


FREE_KEY = {"IfNoneMatch": "*"}


def _write_condition(head: dict[str, Any] | None) -> dict[str, str]:
    """Write only if the key is still free, or still holds the object `head` saw."""
    return FREE_KEY if head is None else {"IfMatch": str(head["ETag"])}


def announce(catalog: Catalog, streams: RedisStreams, record: EventRecord) -> None:
    """XADD to `dlm:new-export`, then note it; a crash in between re-announces."""
    assert record.object_key and record.size is not None and record.sha256
    assert record.uploaded_at is not None
    streams.announce_export(
        ref_id=record.ref_id,
        sha256=record.sha256,
        size=record.size,
        key=f"{record.bucket}/{record.object_key}",
        uploaded_at=record.uploaded_at,
    )
    catalog.mark_announced(record.ref_id)


@dataclass(frozen=True)
class Linger:
    """How a warm run keeps taking its partition's never-tried events.

    The run polls the catalog, where the sensor records new events, until it has
    been idle for `idle_seconds`, has run for `max_seconds`, or another run of its
    system waits. Then it calls `stop_accepting` (after which the sensor requests a
    new run for new events) and keeps taking what arrives for `grace_seconds` (the
    sensor acts on an answer up to a second old), so that an event is never left
    between the two.
    """

    idle_seconds: float
    max_seconds: float
    stop_accepting: Callable[[], None]
    others_waiting: Callable[[], bool]
    grace_seconds: float
    poll_seconds: float = 0.2
    others_every_seconds: float = 2.0


def export_partition(
    exporter: Exporter,
    partition_key: str,
    records: Iterable[EventRecord],
    *,
    force: bool,
    concurrency: int,
    heartbeat_seconds: float,
    on_heartbeat: Callable[[bool], None],
    linger: Linger | None = None,
) -> list[ExportOutcome]:
    """Export `records` (and, while lingering, each new event of the partition), at
    most `concurrency` at once; `on_heartbeat(accepting)` is called every
    `heartbeat_seconds`."""
    started = time.monotonic()
    taken: set[str] = set()
    futures: list[Future[ExportOutcome]] = []
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="export") as pool:

        def take(batch: Iterable[EventRecord]) -> int:
            new = [r for r in batch if r.ref_id not in taken]
            for record in new:
                taken.add(record.ref_id)
                futures.append(pool.submit(exporter.export, record, force=force))
            if exporter.progress is not None:
                exporter.progress.taken(len(new))
            return len(new)

        def poll() -> int:
            waiting = exporter.catalog.ref_ids_in_partition(
                partition_key, EventStatus.RECEIVED.value
            )
            new = [ref_id for ref_id in waiting if ref_id not in taken]
            if not new:
                return 0
            return take(
                sorted(exporter.catalog.get_many(new), key=lambda r: (r.timestamp, r.ref_id))
            )

        take(records)
        accepting = linger is not None
        closing_until: float | None = None  # after the stop, polling for the grace
        try:
            now = time.monotonic()
            next_beat, last_active, next_others = now + heartbeat_seconds, now, now
            while True:
                now = time.monotonic()
                pending = [f for f in futures if not f.done()]
                if now >= next_beat:
                    on_heartbeat(accepting)
                    next_beat = now + heartbeat_seconds
                if linger is not None and accepting:
                    if pending:
                        last_active = now
                    if poll():
                        last_active = now
                    others = False
                    if now >= next_others:
                        next_others = now + linger.others_every_seconds
                        others = linger.others_waiting()
                    if (
                        now - last_active >= linger.idle_seconds
                        or now - started >= linger.max_seconds
                        or others
                    ):
                        linger.stop_accepting()
                        accepting = False
                        closing_until = time.monotonic() + linger.grace_seconds
                elif closing_until is not None:
                    poll()  # what the sensor recorded before it saw us stop
                    if now >= closing_until:
                        closing_until = None  # that was the last poll
                pending = [f for f in futures if not f.done()]
                if not accepting and closing_until is None and not pending:
                    break
                step = max(0.0, next_beat - now)
                if linger is not None and (accepting or closing_until is not None):
                    step = min(step, linger.poll_seconds)
                if pending:
                    wait(pending, timeout=step, return_when=FIRST_COMPLETED)
                else:
                    time.sleep(step)
        finally:
            if linger is not None and accepting:
                linger.stop_accepting()  # failed: the sweep takes what arrives now
    return [f.result() for f in futures]
