"""Reconciliation at scale: 1,000,000 catalogued events within 10 minutes, below 500 MB.

    python -m bench reconcile [--events=N] [--objects=M]

(Options take the `--name=value` form: `python -m bench` reads bare words as names.)

Starts its own SeaweedFS on loopback and creates temporary PostgreSQL databases
(`DLM_BENCH_POSTGRES_URL`, an admin URL; dropped at the end). Three measurements, the
first two each in a fresh child process whose peak RSS is the reconciliation's own:

- **real**: a SeaweedFS bucket of M small objects and their M catalog rows; faults:
  0.1 % of the objects deleted (object_missing), 1 % with no archive location, half
  of those tagged `archived=true` (archive_recovered) and half not (not_archived);
- **scale**: N catalog rows, the bucket listing generated in key order (the same
  objects; 0.1 % of those beyond M left out, so their HEADs go to the real store and
  find nothing: object_missing), the same tag lookups against the real bucket, and a
  data root with 1,000 event folders and 10 folders no event names;
- **listing**: the real bucket listed alone: objects per second; then the scale run
  again with the generated listing paced at that rate (a page of 1,000 keys takes as
  long as a real page did): the measured extrapolation to N objects in S3.

Seeding is not timed. Exit status 1 if the paced run takes 600 s or more, a peak RSS is
500 MB or more, or the findings are not exactly the seeded faults.
"""

from __future__ import annotations

import argparse
import csv
import io
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

ACCESS_KEY = "dlm-bench"
SECRET_KEY = "dlm-bench-secret"
BUCKET = "dlm-bench-reconcile"
TARGET_SECONDS = 600.0
TARGET_RSS_MB = 500.0
OBJECT_BYTES = 1024
SHA256 = "0" * 64
DAY = "20261101"
LOCAL_FOLDERS = 1000
UNANNOUNCED = 10
COLUMNS = (
    "ref_id", "stream_id", "system", "experiment_id", "event_type", "timestamp",
    "partition_key", "local_path", "img_count", "metadata", "received_at", "status",
    "bucket", "object_key", "key_collision", "size", "sha256", "uploaded_at", "verified_at",
    "attempts", "archive_path", "archived_at",
)  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench reconcile")
    parser.add_argument("--events", type=int, default=1_000_000, help="catalogued events")
    parser.add_argument("--objects", type=int, default=100_000, help="real objects in S3")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "DLM_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
        ),
    )
    return parser.parse_args(argv)


# --- the seeded world: event i, its key, its faults -----------------------------------------


def ref_id(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


def experiment(i: int) -> str:
    return f"exp-{i // 1000:05d}"


def key(i: int) -> str:
    """Increasing in i, so seeding order is key order."""
    return f"images/{experiment(i)}/{DAY}/{i % 1000:06d}.tar"


def unarchived(i: int, objects: int) -> bool:
    return i < objects and i % 100 == 7  # 1 % of the real objects


def tagged(i: int) -> bool:
    return i % 200 == 7  # half of the unarchived ones


def deleted(i: int, objects: int) -> bool:
    return i < objects and i % 1000 == 999  # real phase: deleted from the bucket


def unlisted(i: int, objects: int) -> bool:
    return i >= objects and i % 1000 == 999  # scale phase: left out of the listing


def seed_catalog(database_url: str, count: int, objects: int, uploaded: datetime) -> None:
    """`count` verified events by COPY, 100,000 rows at a time."""
    import sqlalchemy as sa

    from dlm_pipelines.catalog import Catalog, migrate

    migrate(database_url)
    catalog = Catalog(database_url=database_url)
    long_ago = datetime.now(UTC) - timedelta(days=10)
    connection = catalog.engine.raw_connection()
    try:
        cursor = connection.cursor()
        for start in range(0, count, 100_000):
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            for i in range(start, min(count, start + 100_000)):
                archived = not unarchived(i, objects)
                archive_path = f"images/{experiment(i)}/{DAY}.tar" if archived else ""
                writer.writerow(
                    (
                        ref_id(i), "0-1", "prince", experiment(i), "stitch",
                        "2026-11-01T00:00:00+00:00", "2026-11-01|prince",
                        f"Images/{experiment(i)}/{i % 1000:06d}", 1, "{}",
                        long_ago.isoformat(), "verified", BUCKET, key(i), "f",
                        OBJECT_BYTES, SHA256, uploaded.isoformat(), long_ago.isoformat(), 1,
                        archive_path, long_ago.isoformat() if archived else "",
                    )
                )  # fmt: skip
            buffer.seek(0)
            cursor.copy_expert(
                f"COPY imaging_event ({', '.join(COLUMNS)}) FROM STDIN WITH (FORMAT csv)",
                buffer,
            )
        connection.commit()
    finally:
        connection.close()
    with catalog.engine.begin() as conn:
        conn.execute(sa.text("ANALYZE imaging_event"))


def seed_bucket(store: Any, objects: int) -> None:
    body = b"\0" * OBJECT_BYTES

    def put(i: int) -> None:
        store.client.put_object(Bucket=BUCKET, Key=key(i), Body=body)
        if unarchived(i, objects) and tagged(i):
            store.client.put_object_tagging(
                Bucket=BUCKET,
                Key=key(i),
                Tagging={"TagSet": [{"Key": "archived", "Value": "true"}]},
            )
        if deleted(i, objects):
            store.client.delete_object(Bucket=BUCKET, Key=key(i))

    with ThreadPoolExecutor(32) as pool:
        for _ in pool.map(put, range(objects), chunksize=256):
            pass


def seed_data_root(root: Path) -> None:
    """Event folders written before their export, and folders no event names."""
    hours_ago = time.time() - 7200
    for i in range(LOCAL_FOLDERS):
        folder = root / "prince" / "Images" / experiment(i) / f"{i % 1000:06d}"
        folder.mkdir(parents=True)
        (folder / "img.tif").write_bytes(b"\0")
        for path in (folder / "img.tif", folder):
            os.utime(path, (hours_ago, hours_ago))
    for n in range(UNANNOUNCED):
        folder = root / "prince" / "Images" / f"zz-unannounced-{n}"
        folder.mkdir(parents=True)
        (folder / "img.tif").write_bytes(b"\0")
        for path in (folder / "img.tif", folder):
            os.utime(path, (hours_ago, hours_ago))


def generated_listing(
    prefix: str, *, events: int, objects: int, rate: float | None
) -> Iterator[list[Any]]:
    """The listing of all N objects, in key order; with `rate`, a page of 1,000 keys
    takes as long as the real bucket took for one."""
    from dlm_pipelines.reconciler import ListedObject

    if prefix != "images/":
        return
    written = datetime.now(UTC) - timedelta(days=11)  # before the catalogued upload
    page_due = time.monotonic()
    for start in range(0, events, 1000):
        if rate is not None:
            page_due += 1000 / rate
            time.sleep(max(0.0, page_due - time.monotonic()))
        yield [
            ListedObject(key(i), OBJECT_BYTES, "etag", written)
            for i in range(start, min(events, start + 1000))
            if not unlisted(i, objects)
        ]


# --- one reconciliation in a child process ----------------------------------------------------


def reconcile_child(
    database_url: str,
    endpoint_url: str,
    root: str,
    generated: tuple[int, int, float | None] | None,
    out: Any,
) -> None:
    from dlm_pipelines.catalog import Catalog
    from dlm_pipelines.reconciler import Reconciler
    from dlm_pipelines.resources import ObjectStore

    store = ObjectStore(bucket=BUCKET, endpoint_url=endpoint_url)
    listing = None
    if generated is not None:
        events, objects, rate = generated
        listing = partial(generated_listing, events=events, objects=objects, rate=rate)
    reconciler = Reconciler(
        catalog=Catalog(database_url=database_url),
        client=store.client,
        bucket=BUCKET,
        data_root=Path(root),
        systems=["prince", "tsu-exp002", "tsu-exp003"],
        listing=listing,
    )
    started = time.perf_counter()
    report = reconciler.run()
    seconds = time.perf_counter() - started
    out.send(
        {
            "seconds": seconds,
            "rss_mb": peak_rss_mb(),
            "counts": {str(k): v for k, v in report.counts.items()},
            "scanned": dict(report.scanned),
        }
    )


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not getrusage's ru_maxrss: that
    survives execve, so a spawned child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(
    database_url: str,
    endpoint_url: str,
    root: Path,
    generated: tuple[int, int, float | None] | None,
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=reconcile_child, args=(database_url, endpoint_url, str(root), generated, send)
    )
    child.start()
    result: dict[str, Any] = receive.recv()
    child.join()
    return result


def list_rate(store: Any) -> tuple[int, float]:
    from dlm_pipelines.reconciler import PREFIXES, list_pages

    started = time.perf_counter()
    listed = sum(len(page) for p in PREFIXES for page in list_pages(store.client, BUCKET, p))
    return listed, time.perf_counter() - started


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: kill SeaweedFS, drop dbs

    from dlm_pipelines.dev.seaweedfs import SeaweedFS
    from dlm_pipelines.resources import ObjectStore
    from tests.postgres import temporary_database

    scratch = Path(tempfile.mkdtemp(prefix="dlm-bench-reconcile-"))
    server = SeaweedFS(scratch / "seaweedfs", ACCESS_KEY, SECRET_KEY)
    events, objects = args.events, min(args.objects, args.events)
    try:
        with (
            temporary_database(args.postgres_url, "dlm_bench_reconcile") as real_url,
            temporary_database(args.postgres_url, "dlm_bench_reconcile") as scale_url,
        ):
            server.start()
            store = ObjectStore(bucket=BUCKET, endpoint_url=server.endpoint_url)
            store.ensure_bucket()
            seeding = time.perf_counter()
            seed_bucket(store, objects)
            uploaded = datetime.now(UTC) + timedelta(seconds=2)  # after every object above
            seed_catalog(real_url, objects, objects, uploaded)
            seed_catalog(scale_url, events, objects, uploaded)
            (scratch / "empty").mkdir()
            seed_data_root(scratch / "data")
            print(
                f"seeded {objects} objects, {objects} + {events} catalogued events in "
                f"{time.perf_counter() - seeding:.0f} s (not timed); "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            real = measure(real_url, server.endpoint_url, scratch / "empty", None)
            print(
                f"real:  {objects} objects and events in {real['seconds']:.1f} s, "
                f"peak RSS {real['rss_mb']:.0f} MB; findings {real['counts']}",
                flush=True,
            )
            listed, listing_seconds = list_rate(store)
            rate = listed / listing_seconds
            print(
                f"listing: {listed} real objects alone in {listing_seconds:.1f} s ({rate:.0f}/s)",
                flush=True,
            )
            fast = measure(
                scale_url, server.endpoint_url, scratch / "data", (events, objects, None)
            )
            print(
                f"scale: {events} events, listing generated at full speed, in "
                f"{fast['seconds']:.1f} s, peak RSS {fast['rss_mb']:.0f} MB; "
                f"scanned {fast['scanned']}",
                flush=True,
            )
            # Again with the listing paced at the real bucket's rate: the extrapolation.
            scale = measure(
                scale_url, server.endpoint_url, scratch / "data", (events, objects, rate)
            )
            estimate = scale["seconds"]
            print(
                f"scale: {events} events, listing paced at {rate:.0f} objects/s, in "
                f"{estimate:.1f} s (target {TARGET_SECONDS:.0f} s), peak RSS "
                f"{scale['rss_mb']:.0f} MB; findings {scale['counts']}; "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    unarchived_count = sum(1 for i in range(objects) if unarchived(i, objects))
    recovered = sum(1 for i in range(objects) if unarchived(i, objects) and tagged(i))
    tape = {"archive_recovered": recovered, "not_archived": unarchived_count - recovered}
    expected_real = {"object_missing": sum(deleted(i, objects) for i in range(objects)), **tape}
    missing = sum(unlisted(i, objects) for i in range(events))
    expected_scale = {"object_missing": missing, "unannounced_folder": UNANNOUNCED, **tape}
    problems = []
    # The first scale run recorded the tagged exports' locations: none to recover again.
    expected_paced = {**expected_scale, "archive_recovered": 0}
    runs = (("real", real, expected_real), ("scale", fast, expected_scale))
    for name, result, expected in (*runs, ("paced", scale, expected_paced)):
        found = {k: v for k, v in result["counts"].items() if v}
        if found != {k: v for k, v in expected.items() if v}:
            problems.append(f"{name}: findings {found} != seeded {expected}")
        if result["rss_mb"] >= TARGET_RSS_MB:
            problems.append(f"{name}: peak RSS {result['rss_mb']:.0f} MB")
    if estimate >= TARGET_SECONDS:
        problems.append(f"estimate {estimate:.0f} s")
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0
