"""API latency at 1,000,000 events: the API under load against its bare floor.

    python -m bench api [--events=N] [--reps=N] [--workers=N] [--clients=N]
                        [--page-requests=N] [--event-requests=N] [--floor-processes=N]
                        [--keep] [--database-url=URL]

(Options take the `--name=value` form: `python -m bench` reads bare words as names.)

Builds a temporary PostgreSQL catalog of N events (default 1,000,000, one INSERT ...
SELECT over generate_series, 1M a year, so the last 24 h always hold ~1,900 stitch
exports), points them at real finished runs of a temporary Dagster instance, runs
`dlm api` on loopback as users start it, and drives it with `--clients` (default 20)
concurrent keep-alive HTTP clients. Then, alternating, `--reps` times (default 5):

- api page:    GET /api/1/exports?limit=500 (the default window, the last 24 h);
- floor page:  the same queries (the API's own `exports_page`, on the API's engine)
               plus plain boto3 `generate_presigned_url` (SigV4) of the 500 keys: the
               same 20 callers, each call run whole by the next free one of
               `--floor-processes` processes (default workers × cores, as when the
               API signed with boto3 in a pool per worker: every core busy). That is
               the ideal server for boto3 signing: no HTTP, auth, validation, JSON or
               GIL contention;
- api event:   GET /api/1/events/{ref_id} over 2,000 random ref_ids;
- floor event: the API's own primary-key lookup, 20 concurrent callers in threads
               spread over `--floor-processes` processes.

Each phase reports p50/p95 latency; the summary gives their medians and the median
of the paired p95 ratios. Presigning needs no server (local signing), but the
endpoint URL is on loopback anyway. The database is dropped at the end (unless
`--keep`; `--database-url` reruns against a kept one).
"""

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.catalog_load import bulk_load
from dlm_pipelines.catalog import get_engine
from dlm_pipelines.settings import get_settings

ADMIN_URL = os.environ.get(
    "DLM_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
TOKEN = "bench-token-" + uuid.uuid4().hex
BUCKET = "mycostreams-raw-data"
S3_ENDPOINT = "http://127.0.0.1:9"  # never contacted: presigning is local
PAGE_TARGET = 0.7  # api p95 / floor p95 (issue 15: sign with a cached SigV4 key)
EVENT_TARGET_MS = 25.0
RUNS = 5  # real Dagster runs the events point to

LOAD_SQL = """
INSERT INTO imaging_event (
    ref_id, stream_id, system, experiment_id, event_type, timestamp, partition_key,
    local_path, img_count, metadata, received_at, status, bucket, object_key,
    key_collision, size, sha256, uploaded_at, verified_at, run_id, attempts, last_error)
SELECT
    ref_id, i || '-0', system, experiment_id, event_type, ts,
    to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD') || '|' || system,
    'Images/' || i, 1, '{}', ts, status,
    CASE WHEN verified THEN :bucket END,
    CASE WHEN verified THEN
        (CASE event_type WHEN 'stitch' THEN 'images' WHEN 'video' THEN 'videos'
         ELSE 'overview' END)
        || '/' || experiment_id || '/' || to_char(ts AT TIME ZONE 'UTC', 'YYYYMMDD/HH24MISS')
        || '-' || ref_id || '.tar' END,
    false,
    CASE WHEN verified THEN 1000000 + i END,
    CASE WHEN verified THEN md5(ref_id) || md5(ref_id || 'x') END,
    CASE WHEN verified THEN ts + interval '2 minutes' END,
    CASE WHEN verified THEN ts + interval '2 minutes' END,
    CASE WHEN status <> 'received' THEN (:runs)[1 + i % cardinality(:runs)] END,
    1,
    CASE WHEN status = 'failed' THEN 'S3 said 503' END
FROM (
    SELECT i, gen_random_uuid()::text AS ref_id,
        (ARRAY['prince', 'tsu-exp002', 'tsu-exp003'])[1 + i % 3] AS system,
        'exp-' || (i % 200) AS experiment_id,
        CASE WHEN i % 10 < 7 THEN 'stitch' WHEN i % 10 < 9 THEN 'video'
             ELSE 'overview' END AS event_type,
        now() - interval '3 minutes' - i * interval '31.536 seconds' AS ts,  -- 1M a year
        CASE WHEN i % 100 = 0 THEN 'failed' WHEN i % 100 = 1 THEN 'received'
             ELSE 'verified' END AS status,
        i % 100 > 1 AS verified
    FROM generate_series(1, :n) AS i
) AS generated
"""


# --- the catalog -----------------------------------------------------------------------


def create_database() -> str:
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"dlm_bench_api_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(url: str) -> None:
    get_engine(url).dispose()
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def load_events(url: str, n: int, run_ids: list[str]) -> None:
    statement = sa.text(LOAD_SQL).bindparams(
        sa.bindparam("runs", type_=sa.ARRAY(sa.String)), sa.bindparam("n", type_=sa.Integer)
    )
    bulk_load(url, statement, {"bucket": BUCKET, "n": n, "runs": run_ids})


def sample_ref_ids(url: str, k: int) -> list[str]:
    with get_engine(url).connect() as conn:
        rows = conn.execute(
            sa.text("SELECT ref_id FROM imaging_event TABLESAMPLE SYSTEM (2) LIMIT :k"), {"k": k}
        )
        return [row.ref_id for row in rows]


def dagster_runs(home: Path, k: int) -> list[str]:
    """k real, finished runs in a Dagster instance at `home` (the API reads their status)."""
    from dagster import DagsterInstance, asset, materialize

    @asset
    def bench_export() -> int:
        return 1

    home.mkdir(parents=True, exist_ok=True)
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    instance = DagsterInstance.local_temp(str(home))
    return [
        materialize([bench_export], instance=instance, run_config=quiet).run_id for _ in range(k)
    ]


# --- the floor: the same work, called directly -------------------------------------------


_floor: dict[str, Any] = {}  # in each floor process: the API's engine, a plain boto3 client


def _floor_setup(url: str) -> None:
    import boto3
    from botocore.config import Config

    from dlm_api.deps import read_engine

    _floor["engine"] = read_engine(url)
    _floor["s3"] = boto3.session.Session().client(
        "s3",
        endpoint_url=S3_ENDPOINT,
        # ObjectStore's signing settings (SigV4, path-style)
        config=Config(
            region_name="us-east-1", signature_version="s3v4", s3={"addressing_style": "path"}
        ),
    )


def floor_page() -> float:
    """The page's queries (the API's own `exports_page`) and 500 plain boto3 presigns;
    returns the CPU seconds it took."""
    from dlm_api.routes.exports import exports_page
    from dlm_pipelines.catalog import utcnow

    cpu = time.process_time()
    end = utcnow()
    with _floor["engine"].connect() as connection:
        _, rows = exports_page(
            connection,
            event_type="stitch",
            start=end - timedelta(hours=24),
            end=end,
            limit=500,
            offset=0,
        )
    for row in rows:
        _floor["s3"].generate_presigned_url(
            "get_object", Params={"Bucket": row.bucket, "Key": row.object_key}, ExpiresIn=3600
        )
    if len(rows) != 500:
        raise RuntimeError(f"the last 24 h hold {len(rows)} stitch exports, not 500")
    return time.process_time() - cpu


def floor_events(threads: int, requests: int, ref_ids: list[str]) -> tuple[list[float], float]:
    """`threads` concurrent callers of the API's own primary-key lookup, in this process;
    their latencies and the CPU seconds they took."""
    from dlm_api.routes.events import _event_row

    engine = _floor["engine"]

    def lookup(ref_id: str) -> None:
        with engine.connect() as connection:
            _event_row(connection, ref_id)

    cpu = time.process_time()
    latencies = timed_callers(threads, requests, lambda pick: lookup(pick.choice(ref_ids)))
    return latencies, time.process_time() - cpu


def timed_callers(threads: int, requests: int, call: Callable[[random.Random], Any]) -> list:
    """Latencies of `threads` concurrent callers making `requests` calls each."""
    errors: list[BaseException] = []
    results: list[list[float]] = [[] for _ in range(threads)]

    def caller(i: int) -> None:
        pick = random.Random(os.getpid() * 100 + i)
        try:
            for _ in range(requests):
                started = time.perf_counter()
                call(pick)
                results[i].append(time.perf_counter() - started)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return [x for r in results for x in r]


# --- the load generator: raw HTTP/1.1 keep-alive, cheap on the client side -----------------


async def _client(port: int, paths: list[str], seed: int, requests: int, out: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pick = random.Random(seed)
    try:
        for _ in range(requests):
            request = (
                f"GET {pick.choice(paths)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {TOKEN}\r\n\r\n"
            ).encode()
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            length = int({k.lower(): v for k, v in headers.items()}["content-length"])
            await reader.readexactly(length)
            out.append(time.perf_counter() - started)
            status = int(lines[0].split(" ", 2)[1])
            if status != 200:
                raise RuntimeError(f"{lines[0]} for a benchmark request")
    finally:
        writer.close()


def drive(port: int, paths: list[str], clients: int, requests: int) -> list[float]:
    async def run() -> list[float]:
        out: list[float] = []
        await asyncio.gather(*(_client(port, paths, i, requests, out) for i in range(clients)))
        return out

    return asyncio.run(run())


# --- the run -----------------------------------------------------------------------------


def percentiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49] * 1000, q[94] * 1000


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += [child for child, parent in parents.items() if parent == current]
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def start_api(url: str, home: Path, port: int, workers: int | None, log: Path) -> subprocess.Popen:
    env = os.environ | {
        "DLM_DATABASE_URL": url,
        "DLM_S3_ENDPOINT_URL": S3_ENDPOINT,
        "DLM_S3_BUCKET": BUCKET,
        "DLM_API_TOKENS": f"bench:{TOKEN}",
        "DLM_API_PORT": str(port),
        **({"DLM_API_WORKERS": str(workers)} if workers else {}),
        "DAGSTER_HOME": str(home),
    }
    dlm = Path(sys.executable).parent / "dlm"
    with log.open("w") as out:
        server = subprocess.Popen([str(dlm), "api"], env=env, stdout=out, stderr=out)
    import httpx

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dlm api exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 204:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.terminate()
    raise RuntimeError("dlm api did not answer /health within 90 s")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench api")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workers", type=int, help="DLM_API_WORKERS; default: dlm api's (2)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--floor-processes", type=int, help="default: API workers × cores")
    parser.add_argument("--database-url", help="reuse a catalog built with --keep")
    parser.add_argument("--keep", action="store_true", help="keep the catalog for a rerun")
    parser.add_argument("--page-requests", type=int, default=3, help="per client per phase")
    parser.add_argument("--event-requests", type=int, default=60, help="per client per phase")
    args = parser.parse_args(argv)
    workers = args.workers or get_settings().api_workers
    # every core busy with boto3 signing: the floor the API's old process pools reached
    args.floor_processes = args.floor_processes or workers * (os.cpu_count() or 1)
    if args.clients % args.floor_processes:
        parser.error("--clients must be a multiple of --floor-processes")

    # presigning signs locally with whatever credentials are set; the floor inherits them
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "dlm-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "dlm-bench-secret")
    url = args.database_url or create_database()
    tmp = Path(tempfile.mkdtemp(prefix="dlm-bench-api-"))
    server: subprocess.Popen | None = None
    try:
        started = time.perf_counter()
        run_ids = dagster_runs(tmp / "dagster", RUNS)
        if not args.database_url:
            print(f"catalog {url.rsplit('/', 1)[1]}: {args.events:,} events ...", flush=True)
            load_events(url, args.events, run_ids)
            print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
        else:  # point the events at this run's Dagster runs
            with get_engine(url).begin() as conn:
                conn.execute(
                    sa.text(
                        "UPDATE imaging_event SET run_id ="
                        " (:runs)[1 + abs(hashtext(ref_id)) % cardinality(:runs)]"
                        " WHERE run_id IS NOT NULL"
                    ),
                    {"runs": run_ids},
                )
        ref_ids = sample_ref_ids(url, 2000)

        port = free_port()
        server = start_api(url, tmp / "dagster", port, args.workers, tmp / "api.log")
        print(
            f"dlm api: {workers} worker(s), "
            f"{args.clients} concurrent clients, loopback; "
            f"floor: {args.floor_processes} processes",
            flush=True,
        )
        page_paths = ["/api/1/exports?limit=500"]
        event_paths = [f"/api/1/events/{r}" for r in ref_ids]
        per_process = args.clients // args.floor_processes
        floor_pool = ProcessPoolExecutor(
            args.floor_processes,
            mp_context=get_context("spawn"),
            initializer=_floor_setup,
            initargs=(url,),
        )

        def api_phase(paths: list[str]) -> Callable[[int], tuple[list[float], float]]:
            def run(requests: int) -> tuple[list[float], float]:
                before = cpu_seconds(server_pids)
                latencies = drive(port, paths, args.clients, requests)
                return latencies, cpu_seconds(server_pids) - before

            return run

        def floor_pages(requests: int) -> tuple[list[float], float]:
            cpu: list[float] = []
            latencies = timed_callers(
                args.clients,
                requests,
                lambda _: cpu.append(floor_pool.submit(floor_page).result()),
            )
            return latencies, sum(cpu)

        def floor_lookups(requests: int) -> tuple[list[float], float]:
            jobs = [
                floor_pool.submit(floor_events, per_process, requests, ref_ids)
                for _ in range(args.floor_processes)
            ]
            done = [job.result() for job in jobs]
            return [x for latencies, _ in done for x in latencies], sum(c for _, c in done)

        # name: (run with n requests per client → latencies and CPU seconds, n)
        phases: dict[str, tuple[Callable[[int], tuple[list[float], float]], int]] = {
            "api page": (api_phase(page_paths), args.page_requests),
            "floor page": (floor_pages, args.page_requests),
            "api event": (api_phase(event_paths), args.event_requests),
            "floor event": (floor_lookups, args.event_requests),
        }
        server_pids: list[int] = []
        for run, n in phases.values():  # warm-up: connections, caches, pool processes
            run(max(1, n // 10))
        server_pids = process_tree(server.pid)  # uvicorn and its workers
        # per phase and repetition: p50 ms, p95 ms, CPU ms per request
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in phases}
        print(f"\n{'rep':>3}  " + "  ".join(f"{n + ' p50/p95 ms':>24}" for n in phases))
        for rep in range(1, args.reps + 1):
            row = []
            for name, (run, n) in phases.items():
                latencies, cpu = run(n)
                p50, p95 = percentiles(latencies)
                results[name].append((p50, p95, cpu * 1000 / len(latencies)))
                row.append(f"{p50:11.1f} / {p95:8.1f}")
            print(f"{rep:>3}  " + "  ".join(f"{r:>24}" for r in row), flush=True)
        floor_pool.shutdown()

        def median(name: str, i: int) -> float:
            return statistics.median(r[i] for r in results[name])

        def ratio(a: str, b: str, i: int = 1) -> float:
            return statistics.median(
                x[i] / y[i] for x, y in zip(results[a], results[b], strict=True)
            )

        page_ratio = ratio("api page", "floor page")
        event_p95 = median("api event", 1)
        print("\nmedians over repetitions (ms; CPU: of the API's processes or the floor's):")
        for name in phases:
            print(
                f"  {name:<12} p50 {median(name, 0):8.1f}   p95 {median(name, 1):8.1f}"
                f"   CPU per request {median(name, 2):6.2f}"
            )
        print(
            f"\nexports?limit=500  p95 api/floor = {page_ratio:.2f} "
            f"(target <= {PAGE_TARGET}) {'OK' if page_ratio <= PAGE_TARGET else 'MISSED'}; "
            f"CPU per page api/floor = {ratio('api page', 'floor page', 2):.2f}"
        )
        print(
            f"events/{{ref_id}}   p95 = {event_p95:.1f} ms (target <= {EVENT_TARGET_MS:.0f} ms) "
            f"{'OK' if event_p95 <= EVENT_TARGET_MS else 'MISSED'}; "
            f"api/floor = {ratio('api event', 'floor event'):.2f}; "
            f"CPU per request api/floor = {ratio('api event', 'floor event', 2):.2f}"
        )
        return 0 if page_ratio <= PAGE_TARGET and event_p95 <= EVENT_TARGET_MS else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        if args.keep or args.database_url:
            print(f"catalog kept: --database-url={url}")
        else:
            drop_database(url)
        shutil.rmtree(tmp, ignore_errors=True)
