"""Purge throughput: eligible events (small folders) deleted after a fresh HEAD each.

    python -m bench purge [--events=N] [--pair-events=M] [--reps=R] [--concurrency=C]

(Options take the `--name=value` form: `python -m bench` reads bare words as names.)

Starts its own SeaweedFS on loopback and creates a temporary PostgreSQL database
(`DLM_BENCH_POSTGRES_URL`, an admin URL; dropped at the end). Seeds N verified events
received a day ago (a 1 KiB object each in S3, with its sha256 metadata) and then:

- the purge **job** (`execute_in_process`, the op the schedule runs) over all N events,
  3 times, folders re-created and catalog rows reset in between: events per second;
- side by side, R repetitions alternating the order, `Purger.run` over M events with
  the bounded pool (C threads: HEAD, claim and delete of C events at once) against the
  same purge with a pool of one (every HEAD after the other): the paired ratio.

Seeding and resets are not timed. Exit status 1 if the job takes 60 s or more for N,
or if any event is left unpurged.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from dagster import DagsterEventType, instance_for_test

from dlm_pipelines.catalog import EVENTS, Catalog, EventStatus, migrate, utcnow
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.dev.seaweedfs import SeaweedFS
from dlm_pipelines.events import EventMetadata, EventType, ImagingEvent
from dlm_pipelines.partitions import partition_key_for
from dlm_pipelines.purge_policy import DiskLevel, PurgePolicy
from dlm_pipelines.purger import Purger
from dlm_pipelines.resources import ObjectStore
from dlm_pipelines.settings import Settings
from tests.postgres import temporary_database

ACCESS_KEY = "dlm-bench"
SECRET_KEY = "dlm-bench-secret"
BUCKET = "dlm-bench-purge"
JOB_TARGET_SECONDS = 60.0
JOB_REPS = 3
FILE_BYTES = 1024
METADATA = {
    "application": {"application": "bench", "version": "1", "user": "bench"},
    "camera": {
        "model": "m",
        "station_name": "s",
        "exposure_time": 1.0,
        "frame_rate": None,
        "frame_size": None,
        "binning": "1x1",
        "gain": None,
        "gamma": None,
        "intensity": [1.0],
        "bits_per_pixel": 8,
    },
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench purge")
    parser.add_argument("--events", type=int, default=10_000, help="events for the job run")
    parser.add_argument("--pair-events", type=int, default=1_000, help="events per paired run")
    parser.add_argument("--reps", type=int, default=5, help="paired repetitions (at least 5)")
    parser.add_argument("--concurrency", type=int, default=None, help="DLM_PURGE_CONCURRENCY")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "DLM_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
        ),
    )
    return parser.parse_args(argv)


class Bench:
    """N verified events: rows in the catalog, objects in S3, folders under the data root."""

    def __init__(self, catalog: Catalog, store: ObjectStore, root: Path, weed_pid: int) -> None:
        self.catalog, self.store, self.root, self.weed_pid = catalog, store, root, weed_pid
        self.ref_ids: list[str] = []

    def seed(self, count: int) -> None:
        now = datetime.now(UTC)
        events = [
            ImagingEvent(
                ref_id=str(uuid.uuid4()),
                experiment_id="bench",
                timestamp=now - timedelta(days=1),
                type=EventType.STITCH,
                system="prince",
                local_path=f"Images/{i:05d}",
                img_count=1,
                metadata=EventMetadata.model_validate(METADATA),
            )
            for i in range(count)
        ]
        self.ref_ids = [e.ref_id for e in events]
        received = now - timedelta(days=1)
        for start in range(0, count, 1000):
            chunk = events[start : start + 1000]
            self.catalog.record_events([(e, "0-1", partition_key_for(e)) for e in chunk], received)

        def put(event: ImagingEvent) -> dict[str, Any]:
            body = event.ref_id.encode().ljust(FILE_BYTES, b".")
            digest = hashlib.sha256(body).hexdigest()
            key = event.collision_free_key
            self.store.client.put_object(
                Bucket=BUCKET,
                Key=key,
                Body=body,
                Metadata={"ref-id": event.ref_id, "sha256": digest},
            )
            return {"r": event.ref_id, "k": key, "s": len(body), "h": digest}

        with ThreadPoolExecutor(32) as pool:
            rows = list(pool.map(put, events))
        table = EVENTS
        verified = (
            sa.update(table)
            .where(table.c.ref_id == sa.bindparam("r"))
            .values(
                status=EventStatus.VERIFIED.value,
                bucket=BUCKET,
                object_key=sa.bindparam("k"),
                size=sa.bindparam("s"),
                sha256=sa.bindparam("h"),
            )
        )
        with self.catalog.engine.begin() as conn:
            conn.execute(verified, rows)
            conn.execute(sa.text("ANALYZE imaging_event"))  # as autovacuum would, in time

    def reset(self, ref_ids: list[str]) -> None:
        """Folders back on disk, rows verified and unpurged, the export after the folders."""
        shutil.rmtree(self.root / "prince", ignore_errors=True)
        index = {r: i for i, r in enumerate(self.ref_ids)}
        for ref_id in ref_ids:
            folder = self.root / "prince" / "Images" / f"{index[ref_id]:05d}"
            folder.mkdir(parents=True)
            (folder / "img.tif").write_bytes(b"\0" * FILE_BYTES)
        os.sync()  # on disk, as hours-old folders are: no writeback during the timed run
        exported = datetime.now(UTC) + timedelta(seconds=1)  # after every mtime above
        table = EVENTS
        with self.catalog.engine.begin() as conn:
            conn.execute(
                sa.update(table)
                .where(table.c.ref_id.in_(ref_ids))
                .values(
                    status=EventStatus.VERIFIED.value,
                    purged_at=None,
                    bytes_freed=None,
                    run_id="bench-export",
                    claimed_at=exported,
                    uploaded_at=exported,
                    verified_at=exported,
                )
            )

    def unpurged(self) -> int:
        return len(self.catalog.unpurged(["prince"]))


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_part(bench: Bench) -> dict[str, dict[int, float]]:
    with bench.catalog.engine.connect() as conn:
        backends = list(
            conn.scalars(
                sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            )
        )
    parts = {"dlm": [os.getpid()], "SeaweedFS": [bench.weed_pid], "PostgreSQL": backends}
    return {part: {pid: process_cpu(pid) for pid in pids} for part, pids in parts.items()}


def cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict:
    return {
        part: sum(cpu - before[part].get(pid, 0.0) for pid, cpu in pids.items())
        for part, pids in after.items()
    }


def time_job(bench: Bench, defs: Any, instance: Any) -> tuple[float, float, dict[str, float]]:
    """The job's wall time, the part its op spent purging, and the CPU seconds it cost."""
    bench.reset(bench.ref_ids)
    before = cpu_by_part(bench)
    started = time.perf_counter()
    result = defs.resolve_job_def("purge").execute_in_process(instance=instance)
    seconds = time.perf_counter() - started
    cpu = cpu_used(before, cpu_by_part(bench))
    assert result.success, "the purge job failed"
    assert bench.unpurged() == 0, f"{bench.unpurged()} events left unpurged"
    (output,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_OUTPUT]
    return seconds, output.event_specific_data.metadata["seconds"].value, cpu


def time_purger(bench: Bench, ref_ids: list[str], concurrency: int, policy: PurgePolicy) -> float:
    bench.reset(ref_ids)
    purger = Purger(
        catalog=bench.catalog,
        store=bench.store,
        data_root=bench.root,
        policy=policy,
        run_id=f"bench-{uuid.uuid4().hex[:8]}",
        concurrency=concurrency,
    )
    started = time.perf_counter()
    outcomes = purger.run(utcnow(), DiskLevel(total=1, free=1))
    seconds = time.perf_counter() - started
    purged = [o for o in outcomes if o.why is not None]
    assert len(purged) == len(ref_ids), [o for o in outcomes if o.why is None][:3]
    return seconds


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.reps < 5:
        print("--reps must be at least 5 (paired ratios need repetitions)")
        return 2
    concurrency = args.concurrency or Settings().purge_concurrency
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: kill SeaweedFS, drop db

    scratch = Path(tempfile.mkdtemp(prefix="dlm-bench-purge-"))
    server = SeaweedFS(scratch / "seaweedfs", ACCESS_KEY, SECRET_KEY)
    try:
        with temporary_database(args.postgres_url, "dlm_bench_purge") as database_url:
            server.start()
            settings = Settings(
                database_url=database_url,
                s3_endpoint_url=server.endpoint_url,
                s3_bucket=BUCKET,
                data_root=scratch / "data",
                purge_systems="prince",
                purge_min_free=0,
                purge_concurrency=concurrency,
            )
            catalog = Catalog(database_url=database_url)
            migrate(catalog.database_url)
            store = ObjectStore(bucket=BUCKET, endpoint_url=server.endpoint_url)
            store.ensure_bucket()
            assert server.process is not None
            bench = Bench(catalog, store, scratch / "data", server.process.pid)
            seeding = time.perf_counter()
            bench.seed(args.events)
            print(
                f"SeaweedFS {server.endpoint_url}, PostgreSQL {database_url.rsplit('/', 1)[1]}; "
                f"seeded {args.events} verified events in {time.perf_counter() - seeding:.1f} s "
                "(not timed below); "
                f"pool of {concurrency}; load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            return run(bench, settings, args)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def run(bench: Bench, settings: Settings, args: argparse.Namespace) -> int:
    defs = build_definitions(settings)
    policy = PurgePolicy.from_settings(settings)
    concurrency = settings.purge_concurrency
    with instance_for_test() as instance:
        job_seconds, floors = [], []
        for rep in range(JOB_REPS):
            seconds, purging, cpu = time_job(bench, defs, instance)
            job_seconds.append(seconds)
            # Two cores to itself, the run could not be faster than its CPU allows:
            # the Python part is one core at most (the GIL), all parts share two.
            floors.append(max(cpu["dlm"], sum(cpu.values()) / 2))
            per_event = ", ".join(f"{part} {1000 * s / args.events:.2f}" for part, s in cpu.items())
            print(
                f"job rep {rep}: {args.events} events in {seconds:.2f} s "
                f"({args.events / seconds:.0f} events/s; {purging:.2f} s of it in Purger.run); "
                f"CPU ms per event: {per_event}; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )

    subset = bench.ref_ids[: args.pair_events]
    pooled, single, ratios = [], [], []
    print(
        f"{'rep':>3} {'first':>10} {'pool s':>8} {'ev/s':>6} "
        f"{'one s':>8} {'ev/s':>6} {'one/pool':>8}"
    )
    for rep in range(args.reps):
        order = ("pool", "sequential") if rep % 2 == 0 else ("sequential", "pool")
        times = {
            variant: time_purger(bench, subset, concurrency if variant == "pool" else 1, policy)
            for variant in order
        }
        pooled.append(times["pool"])
        single.append(times["sequential"])
        ratios.append(times["sequential"] / times["pool"])
        n = len(subset)
        print(
            f"{rep:>3} {order[0]:>10} {pooled[-1]:>8.2f} {n / pooled[-1]:>6.0f} "
            f"{single[-1]:>8.2f} {n / single[-1]:>6.0f} {ratios[-1]:>8.2f}",
            flush=True,
        )

    job_median = statistics.median(job_seconds)
    print(
        f"\npurge job, {args.events} events: median {job_median:.2f} s = "
        f"{args.events / job_median:.0f} events/s (target < {JOB_TARGET_SECONDS:.0f} s: "
        f"{'met' if job_median < JOB_TARGET_SECONDS else 'MISSED'}); its CPU alone, on two "
        f"idle cores, would take at least {statistics.median(floors):.1f} s"
    )
    print(
        f"{len(subset)} events: pool of {concurrency} median {statistics.median(pooled):.2f} s "
        f"({len(subset) / statistics.median(pooled):.0f} events/s), sequential HEADs median "
        f"{statistics.median(single):.2f} s ({len(subset) / statistics.median(single):.0f} "
        f"events/s); sequential / pool = {statistics.median(ratios):.2f}× (median of "
        f"{len(ratios)} paired ratios)"
    )
    return 0 if job_median < JOB_TARGET_SECONDS else 1
