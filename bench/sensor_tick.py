"""The imaging sensor's tick against a catalog of 1,000,000 events.

    python -m bench sensor_tick [--events=N] [--new=M] [--reps=R] [--idle-ticks=K]
                                [--keep] [--database-url=URL]

(Options take the `--name=value` form: `python -m bench` reads bare words as names.)

Builds a temporary PostgreSQL catalog (`DLM_BENCH_POSTGRES_URL`, an admin URL) of N
events (default 1,000,000: one INSERT ... SELECT over generate_series, spread over the
last year, as a year of a busy lab leaves them: verified, most of them purged, some
failed or needing attention, 20 claimed by two live export runs). Then, R times
(default 20):

- M (default 5,000) new, valid imaging events are XADDed to a Redis stream of the
  bench's own (not timed), and one tick of the real `imaging_event_sensor` (built by
  `build_definitions`, evaluated with `build_sensor_context` against a real Dagster
  instance, `DLM_SENSOR_BATCH_SIZE` = M) reads them all: **tick, M new**;
- the new events are marked verified, as their export runs would (not timed);
- K (default 5) ticks find nothing new: **tick, none new**.

Each tick's time is split into the catalog calls it makes (intake upsert, the status
read of the batch, the sweep's stale partitions, the claims check) and the rest
(Redis, validation, the Dagster instance). Targets (issue 15): p95 ≤ 1 s with M new,
≤ 100 ms with none. Exit status 1 if one is missed or a tick lost an event. The
database is dropped at the end (unless `--keep`; `--database-url` reruns against a
kept one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from dagster import DagsterRunStatus, SensorResult, build_sensor_context, instance_for_test

from bench.catalog_load import bulk_load, vacuum
from dlm_pipelines.catalog import Catalog, get_engine, migrate
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.settings import Settings
from tests.postgres import temporary_database

ADMIN_URL = os.environ.get(
    "DLM_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("DLM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SYSTEMS = ("prince", "tsu-exp002", "tsu-exp003")
NEW_TARGET_S = 1.0
IDLE_TARGET_S = 0.1
CLAIMED = 20  # events held by live export runs
# the catalog calls of a tick, timed separately
CATALOG_CALLS = ("record_events", "statuses", "stale_partitions", "claims")

METADATA = json.dumps(
    {
        "application": {"application": "bench", "version": "1", "user": "bench"},
        "camera": {
            "model": "m",
            "station_name": "s",
            "exposure_time": 0.01,
            "frame_rate": None,
            "frame_size": [1, 1],
            "binning": "1x1",
            "gain": 1.0,
            "gamma": 1.0,
            "intensity": [0.0, 0.0, 0.0],
            "bits_per_pixel": 0.0,
            "pixel_size": None,
        },
        "stitching": {"last_focused_at": "2000-01-01T00:00:00Z", "grid_size": [1, 1]},
        "video": None,
    }
)

LOAD_SQL = """
INSERT INTO imaging_event (
    ref_id, stream_id, system, experiment_id, event_type, timestamp, partition_key,
    local_path, img_count, metadata, received_at, status, bucket, object_key,
    key_collision, size, sha256, uploaded_at, verified_at, announced_at, run_id,
    attempts, last_error, purged_at, bytes_freed)
SELECT
    ref_id, i || '-0', system, experiment_id, event_type, ts,
    to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD') || '|' || system,
    'Images/' || i, 1, '{}', ts, status,
    CASE WHEN uploaded THEN 'mycostreams-raw-data' END,
    CASE WHEN uploaded THEN 'images/' || experiment_id || '/'
        || to_char(ts AT TIME ZONE 'UTC', 'YYYYMMDD/HH24MISS') || '-' || ref_id || '.tar' END,
    false,
    CASE WHEN uploaded THEN 1000000 + i END,
    CASE WHEN uploaded THEN md5(ref_id) || md5(ref_id || 'x') END,
    CASE WHEN uploaded THEN ts + interval '2 minutes' END,
    CASE WHEN uploaded THEN ts + interval '2 minutes' END,
    CASE WHEN uploaded THEN ts + interval '2 minutes' END,
    CASE WHEN i <= :claimed THEN (:runs)[1 + i % cardinality(:runs)]
         ELSE 'run-' || (i / 3) END,
    CASE WHEN status = 'failed' THEN 5 ELSE 1 END,
    CASE WHEN status IN ('failed', 'needs_attention') THEN 'S3 said 503' END,
    CASE WHEN purged THEN ts + interval '8 hours' END,
    CASE WHEN purged THEN 1000000 + i END
FROM (
    SELECT i, ref_id, system, experiment_id, event_type, ts, status,
        status IN ('verified', 'needs_attention') AS uploaded,
        status = 'verified' AND ts < now() - interval '8 hours' AND i % 10 <> 0 AS purged
    FROM (
        SELECT i, gen_random_uuid()::text AS ref_id,
            (ARRAY['prince', 'tsu-exp002', 'tsu-exp003'])[1 + i % 3] AS system,
            'exp-' || (i % 200) AS experiment_id,
            CASE WHEN i % 10 < 7 THEN 'stitch' WHEN i % 10 < 9 THEN 'video'
                 ELSE 'overview' END AS event_type,
            now() - interval '10 minutes' - i * interval '31.536 seconds' AS ts,
            CASE WHEN i <= :claimed THEN 'exporting'
                 WHEN i % 1000 = 0 THEN 'failed'
                 WHEN i % 1000 = 1 THEN 'needs_attention'
                 ELSE 'verified' END AS status
        FROM generate_series(1, :n) AS i
    ) AS shaped
) AS generated
"""

# what the export runs would leave on the events a tick recorded (not timed)
EXPORTED_SQL = """
UPDATE imaging_event SET status = 'verified', run_id = 'bench-run',
    bucket = 'mycostreams-raw-data', object_key = 'images/bench/' || ref_id || '.tar',
    size = 1000, sha256 = md5(ref_id) || md5(ref_id), uploaded_at = now(),
    verified_at = now(), announced_at = now(), attempts = 1
WHERE status = 'received'
"""


def load_catalog(url: str, n: int, run_ids: list[str]) -> None:
    statement = sa.text(LOAD_SQL).bindparams(
        sa.bindparam("runs", type_=sa.ARRAY(sa.String)),
        sa.bindparam("n", type_=sa.Integer),
        sa.bindparam("claimed", type_=sa.Integer),
    )
    bulk_load(url, statement, {"n": n, "runs": run_ids, "claimed": CLAIMED})


def live_runs(instance: Any, defs: Any, partition_keys: list[str]) -> list[str]:
    """Export runs in progress (STARTED) in the Dagster instance, one per partition."""
    job = defs.resolve_implicit_global_asset_job_def()
    return [
        instance.create_run_for_job(
            job_def=job,
            tags={
                "dagster/partition": key,
                "dagster/partition/system": key.split("|", 1)[1],
                "dlm/system": key.split("|", 1)[1],
            },
            status=DagsterRunStatus.STARTED,
        ).run_id
        for key in partition_keys
    ]


def publish(client: redis.Redis, stream: str, m: int) -> list[str]:
    """M valid imaging events of today, as microscopes XADD them; their ref_ids."""
    now = datetime.now(UTC)
    ref_ids = [str(uuid.uuid4()) for _ in range(m)]
    pipe = client.pipeline(transaction=False)
    for i, ref_id in enumerate(ref_ids):
        stamp = now - timedelta(milliseconds=m - i)
        pipe.xadd(
            stream,
            {
                "ref_id": ref_id,
                "experiment_id": f"exp-{i % 50}",
                "timestamp": stamp.isoformat().replace("+00:00", "Z"),
                "type": "stitch",
                "system": SYSTEMS[i % len(SYSTEMS)],
                "local_path": f"Images/bench/{ref_id}",
                "img_count": "1",
                "metadata": METADATA,
            },
        )
    pipe.execute()
    return ref_ids


class CallTimer:
    """Seconds spent in each of the catalog calls a tick makes."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    @contextmanager
    def installed(self) -> Iterator[None]:
        originals = {
            name: getattr(Catalog, name) for name in CATALOG_CALLS if hasattr(Catalog, name)
        }

        def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
            @wraps(method)
            def call(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    self.spent[name] += time.perf_counter() - started

            return call

        for name, method in originals.items():
            setattr(Catalog, name, timed(name, method))
        try:
            yield
        finally:
            for name, method in originals.items():
                setattr(Catalog, name, method)


def tick(defs: Any, instance: Any, cursor: str | None, timer: CallTimer) -> tuple[Any, float, dict]:
    sensor = defs.resolve_sensor_def("imaging_event_sensor")
    timer.spent.clear()
    # only the sensor's own resources, as Dagster's code server builds them for a tick
    resources = {k: v for k, v in defs.resources.items() if k in sensor.required_resource_keys}
    with build_sensor_context(
        instance=instance, cursor=cursor, resources=resources, definitions=defs
    ) as context:
        started, cpu = time.perf_counter(), time.process_time()
        result = sensor(context)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    if not isinstance(result, SensorResult):
        raise RuntimeError(f"the sensor returned {result!r}")
    return result, elapsed, {**timer.spent, "cpu": cpu}


def p95(samples: list[float]) -> float:
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=20, method="inclusive")[18]


def report(name: str, samples: list[tuple[float, dict]], target: float) -> bool:
    totals = [t for t, _ in samples]
    ok = p95(totals) <= target
    print(
        f"  {name:<18} p50 {statistics.median(totals) * 1000:8.1f} ms   "
        f"p95 {p95(totals) * 1000:8.1f} ms   max {max(totals) * 1000:8.1f} ms   "
        f"(target p95 <= {target * 1000:.0f} ms) {'OK' if ok else 'MISSED'}"
    )
    parts = "   ".join(
        f"{call} {statistics.median(s.get(call, 0.0) for _, s in samples) * 1000:.1f}"
        for call in CATALOG_CALLS
    )
    rest = statistics.median(t - sum(s.get(c, 0.0) for c in CATALOG_CALLS) for t, s in samples)
    print(f"    medians, ms: {parts}   rest (Redis, parsing, Dagster) {rest * 1000:.1f}")
    cpu = [s["cpu"] for _, s in samples]
    print(
        f"    CPU of the bench process (the tick's Python side), ms: "
        f"p50 {statistics.median(cpu) * 1000:.1f}   p95 {p95(cpu) * 1000:.1f}"
    )
    return ok


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sensor_tick")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=5_000, help="new entries per busy tick")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--idle-ticks", type=int, default=5, help="ticks with none new per rep")
    parser.add_argument("--database-url", help="reuse a catalog built with --keep")
    parser.add_argument("--keep", action="store_true", help="keep the catalog for a rerun")
    args = parser.parse_args(argv)

    if args.database_url:
        return run(args, args.database_url)
    if args.keep:
        name = f"dlm_bench_tick_{uuid.uuid4().hex[:10]}"
        admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        status = run(args, url, build=True)
        print(f"catalog kept: --database-url={url}")
        return status
    with temporary_database(ADMIN_URL, prefix="dlm_bench_tick") as url:
        return run(args, url, build=True)


def run(args: argparse.Namespace, url: str, build: bool = False) -> int:
    prefix = f"dlm-bench:{uuid.uuid4().hex[:8]}"
    settings = Settings(
        database_url=url,
        redis_url=REDIS_URL,
        imaging_event_stream=f"{prefix}:new-imaging-event",
        export_stream=f"{prefix}:new-export",
        dead_letter_stream=f"{prefix}:dead-letter",
        systems=",".join(SYSTEMS),
        partition_start_date="2025-01-01",
        sensor_batch_size=args.new,
        # The tick's work alone: with a wait, a tick also watches the stream (blocked in
        # Redis, no CPU) for DLM_SENSOR_WAIT_SECONDS, by design.
        sensor_wait_seconds=0,
        data_root=Path("/nonexistent-dlm-bench"),
        export_stale_after_seconds=24 * 3600,  # the live runs below log no heartbeats
    )
    defs = build_definitions(settings)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    timer = CallTimer()
    busy: list[tuple[float, dict]] = []
    idle: list[tuple[float, dict]] = []
    lost = 0
    try:
        with instance_for_test() as instance, timer.installed():
            today = datetime.now(UTC).date().isoformat()
            run_ids = live_runs(instance, defs, [f"{today}|{SYSTEMS[0]}", f"{today}|{SYSTEMS[1]}"])
            if build:
                print(f"catalog: {args.events:,} events ...", flush=True)
                started = time.perf_counter()
                load_catalog(url, args.events, run_ids)
                print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
            else:  # point the claims at this run's live runs
                migrate(url)
                with get_engine(url).begin() as conn:
                    conn.execute(
                        sa.text(
                            "UPDATE imaging_event SET run_id = (:runs)[1 + abs(hashtext(ref_id))"
                            " % cardinality(:runs)] WHERE status = 'exporting'"
                        ),
                        {"runs": run_ids},
                    )
                vacuum(url)
            cursor: str | None = None
            result, _, _ = tick(defs, instance, cursor, timer)  # warm-up: connections, imports
            cursor = result.cursor
            print(f"{args.reps} × ({args.new:,} new, then {args.idle_ticks} idle ticks)")
            for rep in range(1, args.reps + 1):
                ref_ids = publish(client, settings.imaging_event_stream, args.new)
                result, elapsed, spent = tick(defs, instance, cursor, timer)
                cursor = result.cursor
                busy.append((elapsed, spent))
                requested = len(result.run_requests or [])
                catalog = Catalog(database_url=url)
                recorded = len(catalog.get_many(ref_ids))
                lost += args.new - recorded
                with catalog.engine.begin() as conn:
                    conn.execute(sa.text(EXPORTED_SQL))
                idle_times = []
                for _ in range(args.idle_ticks):
                    result, elapsed, spent = tick(defs, instance, cursor, timer)
                    if result.run_requests:
                        raise RuntimeError(f"an idle tick requested runs: {result.run_requests}")
                    idle.append((elapsed, spent))
                    idle_times.append(elapsed)
                print(
                    f"  rep {rep:>2}: {args.new:,} new {busy[-1][0] * 1000:7.1f} ms "
                    f"({requested} run requests); idle "
                    + " ".join(f"{t * 1000:.1f}" for t in idle_times)
                    + " ms",
                    flush=True,
                )
    finally:
        client.delete(
            settings.imaging_event_stream, settings.export_stream, settings.dead_letter_stream
        )
    print(f"\ncatalog: {args.events:,} events (+{args.new:,} a rep); ticks:")
    ok_busy = report(f"{args.new:,} new", busy, NEW_TARGET_S)
    ok_idle = report("none new", idle, IDLE_TARGET_S)
    if lost:
        print(f"LOST: {lost} published event(s) never reached the catalog")
    return 0 if ok_busy and ok_idle and not lost else 1
