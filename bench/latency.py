"""Latency through the real process stack: XADD of an imaging event to its verified tar.

    python -m bench latency [--quick] [--duration=S] [--rate=R] [--size=5MB]
                            [--step-rates=2,5,8,12] [--step-seconds=S] [--step-size=2MB]
                            [--fixed-runs=N] [--import-reps=N] [--skip-ladder]
                            [--skip-imports] [--compare-instance=FILE]

(Options take the `--name=value` form: `python -m bench` reads bare words as names.)

Starts, under a temporary directory, the pieces of `dlm dev` that an export needs, as
real processes (`DevStack`): SeaweedFS, the Dagster daemon and webserver on PostgreSQL
storage (a fresh temporary database, dropped at the end), the catalog in a second
temporary database, and Redis (`DLM_BENCH_REDIS_URL`, default the local one) with
stream names of its own, deleted at the end. Settings are the defaults (sensor every
5 s, one export run per system at a time). Then it measures:

1. the run worker's start, side by side: importing the code location with compiled
   bytecode against without it (what `PYTHONDONTWRITEBYTECODE=1` and a venv installed
   without `--compile-bytecode` cost every run), and Dagster alone;
2. Dagster's fixed cost per run: a trivial run (`raw_export` on a partition without
   events) submitted through the public GraphQL client, as the UI does, queued and
   launched by the daemon; request to success, split by the run's own events;
3. one small event on an idle stack, XADD to verified: the smallest latency a user sees;
4. 5 MB events at 1 per second for 5 minutes (mock-prince's writer: each folder is
   written and fsync'ed before its XADD): p50/p95/max of XADD (the stream id's
   milliseconds) to verified (the catalog's `verified_at`), and the backlog (XADDed,
   not yet verified) every 10 s;
5. 2 MB events at rising rates, ~60 s each, stopping at the first that fails: a rate
   holds when, once the pipeline is full (from the step's first verification to its
   last XADD), the mean backlog of that window's second half exceeds its first half's
   by less than one second's worth of events, and the step drains afterwards.

With `--compare-instance=FILE` it first alternates the daemon (restarted each time)
between the project's instance file and FILE, timing bursts of one small event per
system: how an instance setting was judged. Each phase also prints the CPU the stack's
processes used (PostgreSQL's not counted) and the load average: this machine is shared.

Everything it started is stopped at the end, also on errors, Ctrl-C and SIGTERM.
Exit status 1 when a target is missed (not in --quick mode).
"""

from __future__ import annotations

import argparse
import os
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from dlm_pipelines.catalog import Catalog
    from dlm_pipelines.dev.stack import DevStack

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get(
    "DLM_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("DLM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
TARGET_P50 = 15.0
TARGET_P95 = 30.0
TARGET_STEADY_RATE = 5.0
SAMPLE_SECONDS = 10
LEAD_SECONDS = 3  # writers may run this far ahead of the XADD schedule
WRITERS = 3  # one writer does ~9 events/s of 2 MB here (fsync per file)
TRIVIAL_PARTITION_DATE = "2026-01-01"  # DLM_PARTITION_START_DATE: never has events here
RUN_WORKER_IMPORT = "import dlm_pipelines.definitions"


@dataclass(frozen=True)
class Published:
    ref_id: str
    system: str
    xadd_at: float  # epoch seconds, from the stream id

    @classmethod
    def from_entry(cls, stream_id: str, fields: dict[str, str]) -> Published:
        return cls(fields["ref_id"], fields["system"], int(stream_id.split("-")[0]) / 1000)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench latency")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--duration", type=float, help="seconds at --rate (default 300)")
    parser.add_argument("--rate", type=float, default=1.0, help="events/s (default 1)")
    parser.add_argument("--size", default="5MB", help="pixel bytes per event (default 5MB)")
    parser.add_argument("--step-rates", help="events/s of the steps (default 2,5,8,12)")
    parser.add_argument("--step-seconds", type=float, help="seconds per step (default 60)")
    parser.add_argument("--step-size", default="2MB", help="bytes per step event (2MB)")
    parser.add_argument("--fixed-runs", type=int, help="trivial runs (default 5)")
    parser.add_argument("--import-reps", type=int, help="paired import repetitions (5)")
    parser.add_argument("--skip-ladder", action="store_true", help="no rate steps")
    parser.add_argument("--skip-imports", action="store_true", help="no import comparison")
    parser.add_argument(
        "--compare-instance",
        type=Path,
        help="an instance file to alternate the daemon with (bursts of one event per system)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (30.0 if quick else 300.0)
    args.step_rates = [
        float(r) for r in (args.step_rates or ("2,5" if quick else "2,5,8,12")).split(",")
    ]
    args.step_seconds = args.step_seconds or (20.0 if quick else 60.0)
    args.fixed_runs = args.fixed_runs or (3 if quick else 5)
    args.import_reps = args.import_reps or (3 if quick else 5)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from dlm_pipelines.dev.mock_prince import parse_size

    size, step_size = parse_size(args.size), parse_size(args.step_size)
    # SIGTERM unwinds like Ctrl-C: the stack is stopped and the databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="dlm-bench-latency-"))
    try:
        print(f"environment: {bytecode_note()}", flush=True)
        if not args.skip_imports:
            compare_imports(scratch, args.import_reps)
        with running_stack(scratch) as bench:
            if args.compare_instance:
                bench.compare_instance_files(args.compare_instance, args.fixed_runs)
            bench.measure_fixed_cost(args.fixed_runs)
            missed = bench.measure_steady(args.rate, args.duration, size)
            if not args.skip_ladder:
                missed |= bench.measure_ladder(args.step_rates, args.step_seconds, step_size)
        return 1 if missed and not args.quick else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- 1. the run worker's start: bytecode or not ------------------------------------------


def bytecode_note() -> str:
    import dagster

    package = Path(dagster.__file__).parent
    compiled = any(package.glob("__pycache__/*.pyc"))
    return (
        f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}, "
        f"venv bytecode {'compiled' if compiled else 'MISSING (every process compiles)'}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


def compare_imports(scratch: Path, reps: int) -> None:
    """Fresh interpreters importing the code location, alternating the variants."""
    compiled, empty = scratch / "pyc-compiled", scratch / "pyc-none"
    empty.mkdir()
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # A cache prefix of our own, filled once: the variants do not depend on the venv.
    subprocess.run(
        [sys.executable, "-c", RUN_WORKER_IMPORT],
        env=base | {"PYTHONPYCACHEPREFIX": str(compiled)},
        cwd=ROOT,
        check=True,
    )
    variants = {
        "code location, bytecode": (RUN_WORKER_IMPORT, compiled),
        "code location, none": (RUN_WORKER_IMPORT, empty),
        "dagster alone, bytecode": ("import dagster", compiled),
    }
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps):
        names = list(variants)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            code, prefix = variants[name]
            env = base | {"PYTHONPYCACHEPREFIX": str(prefix), "PYTHONDONTWRITEBYTECODE": "1"}
            cpu_before, started = children_cpu(), time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True)
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(children_cpu() - cpu_before)
    print(f"\n## run worker start: `{RUN_WORKER_IMPORT}` in a fresh interpreter ({reps} reps)")
    print("| variant | wall s, median | CPU s, median | wall, all (s) |\n|---|---|---|---|")
    for name in variants:
        print(
            f"| {name} | {statistics.median(wall[name]):.2f} | "
            f"{statistics.median(cpu[name]):.2f} | {fmt_list(wall[name])} |"
        )
    for what, values in (("wall", wall), ("CPU", cpu)):
        ratios = [
            a / b
            for a, b in zip(
                values["code location, bytecode"], values["code location, none"], strict=True
            )
        ]
        print(f"bytecode / none, {what}: median of paired ratios {statistics.median(ratios):.2f}")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- the stack ---------------------------------------------------------------------------


@contextmanager
def running_stack(scratch: Path) -> Iterator[LatencyBench]:
    from dlm_pipelines.catalog import Catalog
    from dlm_pipelines.dev.seaweedfs import free_port_block
    from dlm_pipelines.dev.stack import DevStack
    from dlm_pipelines.settings import Settings
    from tests.postgres import temporary_database

    prefix = f"dlm-bench-latency:{uuid.uuid4().hex[:8]}"
    with ExitStack() as cleanup:
        catalog_url = cleanup.enter_context(temporary_database(ADMIN_URL, "dlm_bench_catalog"))
        dagster_url = cleanup.enter_context(temporary_database(ADMIN_URL, "dlm_bench_dagster"))
        settings = Settings(
            redis_url=REDIS_URL,
            database_url=catalog_url,
            dagster_postgres_url=dagster_url,
            data_root=scratch / "state" / "data",
            s3_bucket=f"dlm-bench-{uuid.uuid4().hex[:8]}",
            imaging_event_stream=f"{prefix}:new-imaging-event",
            export_stream=f"{prefix}:new-export",
            dead_letter_stream=f"{prefix}:dead-letter",
            rabbitmq_url=None,  # the archive sensor idles
        )
        cleanup.callback(_delete_streams, settings)
        ui_port = free_port_block(2)
        stack = DevStack(
            ROOT, scratch / "state", settings=settings, ui_port=ui_port, api_port=ui_port + 1
        )
        cleanup.callback(_stop_quietly, stack)
        started = time.monotonic()
        stack.lock()
        stack.data_root.mkdir(parents=True, exist_ok=True)
        stack.start_object_store()
        stack.start_redis()
        stack.set_up()
        stack.start_dagster(webserver=True, daemon=True)  # the UI: the GraphQL client
        stack.wait_ready()
        os.environ["DAGSTER_HOME"] = str(stack.dagster_home)
        os.environ["DLM_DAGSTER_POSTGRES_URL"] = dagster_url
        bench = LatencyBench(stack, Catalog(database_url=catalog_url))
        cleanup.callback(bench.instance.dispose)
        bench.warm_up()
        print(f"\nstack up and exporting after {time.monotonic() - started:.0f} s", flush=True)
        yield bench


def _stop_quietly(stack: DevStack) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the stop
    try:
        stack.stop()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _delete_streams(settings: Any) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    client.delete(
        settings.imaging_event_stream, settings.export_stream, settings.dead_letter_stream
    )
    client.close()


class LatencyBench:
    def __init__(self, stack: DevStack, catalog: Catalog) -> None:
        import redis
        from dagster import DagsterInstance

        self.stack = stack
        self.catalog = catalog
        self.settings = stack.settings
        self.redis = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        self.instance: DagsterInstance = DagsterInstance.get()

    # --- publishing and waiting ---

    def publish(self, rate: float, seconds: float, size: int) -> list[Published]:
        """`rate` events/s on a fixed schedule; writer threads prepare folders ahead."""
        from dlm_pipelines.dev.mock_prince import MockPrince

        count = max(1, round(rate * seconds))
        ready: queue.Queue[dict[str, str]] = queue.Queue(maxsize=max(2, int(rate * LEAD_SECONDS)))
        claimed = iter(range(count))
        lock, stop = threading.Lock(), threading.Event()
        systems = tuple(self.settings.systems)

        def write() -> None:
            producer = MockPrince(self.stack.data_root, systems=systems, size=size)
            while not stop.is_set():
                with lock:
                    if next(claimed, None) is None:
                        return
                fields, _ = producer.next_event()
                while not stop.is_set():
                    try:
                        ready.put(fields, timeout=1)
                        break
                    except queue.Full:
                        continue

        writers = [threading.Thread(target=write, daemon=True) for _ in range(WRITERS)]
        for writer in writers:
            writer.start()
        published: list[Published] = []
        stream = self.settings.imaging_event_stream
        start = time.monotonic()
        try:
            for n in range(count):
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                fields = ready.get(timeout=60)
                published.append(Published.from_entry(self.redis.xadd(stream, fields), fields))
                if n % max(1, int(rate * 30)) == 0:
                    self.check_alive()
        finally:
            stop.set()
            for writer in writers:
                writer.join(timeout=10)
        return published

    def cpu_meter(self) -> Callable[[int], str]:
        """Call the result after a phase: what the phase's CPU came to, per event."""
        stack_before, self_before = stack_cpu(self.stack.marker), time.process_time()
        started = time.monotonic()

        def report(events: int) -> str:
            stack = stack_cpu(self.stack.marker) - stack_before
            writer = time.process_time() - self_before
            seconds = time.monotonic() - started
            return (
                f"CPU: the stack {stack:.0f} s ({stack / seconds:.2f} cores over "
                f"{seconds:.0f} s, {stack / events:.2f} s per event; PostgreSQL not counted), "
                f"the bench's writers {writer:.0f} s; load average {os.getloadavg()[0]:.1f}"
            )

        return report

    def wait_verified(self, published: Sequence[Published], timeout: float) -> dict[str, float]:
        """ref_id → verified_at (epoch seconds) for those verified within `timeout`."""
        pending = {p.ref_id for p in published}
        verified: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for record in self.catalog.get_many(sorted(pending)):
                if record.verified_at is not None:
                    verified[record.ref_id] = record.verified_at.timestamp()
                    pending.discard(record.ref_id)
            if pending:
                self.check_alive()
                time.sleep(1)
        return verified

    def check_alive(self) -> None:
        broken = self.stack.failed_process()
        if broken is not None:
            raise RuntimeError(f"{broken.name} died; last lines of its log:\n{broken.tail()}")

    def warm_up(self) -> None:
        """One small event through the whole path before anything is timed."""
        published = self.publish(1, 1, 1000)
        if not self.wait_verified(published, timeout=240):
            raise RuntimeError(f"the warm-up event was not verified; logs in {self.stack.logs}")

    # --- 2 and 3: the fixed cost ---

    def measure_fixed_cost(self, runs: int) -> None:
        from dagster_graphql import DagsterGraphQLClient

        client = DagsterGraphQLClient("127.0.0.1", port_number=self.stack.ui_port)
        systems = list(self.settings.systems)
        rows = []
        cpu = -stack_cpu(self.stack.marker, reaped_only=True)
        for n in range(runs):
            system = systems[n % len(systems)]
            run_id = client.submit_job_execution(
                "__ASSET_JOB",
                repository_location_name="dlm",
                asset_selection=["raw_export"],
                run_config={"ops": {"raw_export": {"config": {"ref_ids": []}}}},
                tags={
                    "dagster/partition": f"{TRIVIAL_PARTITION_DATE}|{system}",
                    "dagster/partition/date": TRIVIAL_PARTITION_DATE,
                    "dagster/partition/system": system,
                },
            )
            rows.append(self.wait_for_run(run_id, timeout=300))
        cpu += stack_cpu(self.stack.marker, reaped_only=True)
        print(f"\n## Dagster's fixed cost per run: {runs} trivial runs, one after the other")
        print("(raw_export on a partition without events, submitted with DagsterGraphQLClient")
        print(" as the UI does; queued, dequeued and launched by the daemon; seconds)")
        print_phase_table(rows)
        print(f"CPU of the run worker processes, per trivial run: {cpu / runs:.2f} s")

        small = []
        for _ in range(runs):
            published = self.publish(1, 1, 1000)
            verified = self.wait_verified(published, timeout=240)
            small.append(verified[published[0].ref_id] - published[0].xadd_at)
        print(
            f"\none 1 kB event on the idle stack, XADD to verified: median "
            f"{statistics.median(small):.2f} s ({fmt_list(small)})"
        )

    def wait_for_run(self, run_id: str, timeout: float) -> dict[str, float]:
        from dagster import DagsterRunStatus

        deadline = time.monotonic() + timeout
        while True:
            run = self.instance.get_run_by_id(run_id)
            if run is not None and run.is_finished:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id} did not finish within {timeout:.0f}s")
            self.check_alive()
            time.sleep(0.2)
        if run.status != DagsterRunStatus.SUCCESS:
            raise RuntimeError(f"trivial run {run_id} ended {run.status.value}")
        return self.run_phases(run_id)

    def run_phases(self, run_id: str) -> dict[str, float]:
        """Seconds between the milestones a run records in its event log."""
        from dagster import DagsterEventType as E

        first: dict[Any, float] = {}
        for record in self.instance.get_records_for_run(run_id).records:
            entry = record.event_log_entry
            kind: Any = entry.dagster_event.event_type if entry.dagster_event else None
            if kind is E.ENGINE_EVENT and "Started process" in entry.message:
                kind = "process"  # the run worker is up and has its instance
            first.setdefault(kind, entry.timestamp)
        milestones = [
            ("queued", E.RUN_ENQUEUED),  # → dequeued (RUN_STARTING: the launch begins)
            ("spawn+instance", E.RUN_STARTING),
            ("load code", "process"),
            ("to step", E.RUN_START),
            ("step", E.STEP_START),
            ("finish", E.STEP_SUCCESS),
        ]
        phases = {
            name: first[milestones[n + 1][1] if n + 1 < len(milestones) else E.RUN_SUCCESS]
            - first[since]
            for n, (name, since) in enumerate(milestones)
        }
        phases["total"] = first[E.RUN_SUCCESS] - first[E.RUN_ENQUEUED]
        return phases

    def compare_instance_files(self, other: Path, reps: int) -> None:
        """The daemon alternately on the project's instance file and on `other`."""
        home = self.stack.dagster_home / "dagster.yaml"
        variants = {"project": home.read_text(), other.name: other.read_text()}
        bursts: dict[str, list[float]] = {name: [] for name in variants}
        try:
            for rep in range(reps):
                for name in list(variants)[:: 1 if rep % 2 == 0 else -1]:
                    self.restart_daemon(home, variants[name])
                    self.burst()  # its code server is up and the sensor ticks
                    bursts[name].append(statistics.median([self.burst(), self.burst()]))
        finally:
            self.restart_daemon(home, variants["project"])
        print(f"\n## instance files side by side ({reps} reps, daemon restarted for each)")
        print("a burst: one 1 kB event per system at once, XADD to the last one verified")
        print("| instance file | median s | all (s) |\n|---|---|---|")
        for name, values in bursts.items():
            print(f"| {name} | {statistics.median(values):.2f} | {fmt_list(values)} |")
        ratios = [a / b for a, b in zip(*bursts.values(), strict=True)]
        print(f"project / {other.name}: median of paired ratios {statistics.median(ratios):.2f}")

    def restart_daemon(self, instance_file: Path, text: str) -> None:
        """With no run in flight: stopping the daemon stops its run workers too."""
        self.wait_no_runs(timeout=120)
        daemon = self.stack.processes["daemon"]
        daemon.stop()
        instance_file.write_text(text)
        daemon.start()

    def wait_no_runs(self, timeout: float) -> None:
        from dagster import DagsterRunStatus, RunsFilter

        live = [
            DagsterRunStatus.QUEUED,
            DagsterRunStatus.NOT_STARTED,
            DagsterRunStatus.STARTING,
            DagsterRunStatus.STARTED,
        ]
        deadline = time.monotonic() + timeout
        while self.instance.get_run_records(filters=RunsFilter(statuses=live), limit=1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"runs still in flight after {timeout:.0f}s")
            time.sleep(0.5)

    def burst(self) -> float:
        from dlm_pipelines.dev.mock_prince import MockPrince

        published = []
        for system in self.settings.systems:
            producer = MockPrince(self.stack.data_root, systems=(system,), size=1000)
            fields = producer.valid_event("stitch")
            stream_id = self.redis.xadd(self.settings.imaging_event_stream, fields)
            published.append(Published.from_entry(stream_id, fields))
        verified = self.wait_verified(published, timeout=300)
        if len(verified) < len(published):
            raise RuntimeError("a burst was not verified within 300 s")
        return max(verified[p.ref_id] - p.xadd_at for p in published)

    # --- 4: latency at a steady rate ---

    def measure_steady(self, rate: float, seconds: float, size: int) -> bool:
        print(f"\n## {size / 1e6:g} MB events at {rate:g}/s for {seconds:.0f} s", flush=True)
        cpu = self.cpu_meter()
        published = self.publish(rate, seconds, size)
        verified = self.wait_verified(published, timeout=max(120.0, seconds))
        cpu_note = cpu(len(published))
        latencies = [verified[p.ref_id] - p.xadd_at for p in published if p.ref_id in verified]
        lost = len(published) - len(latencies)
        span = published[-1].xadd_at - published[0].xadd_at
        print(
            f"published {len(published)} at {(len(published) - 1) / span:.2f}/s achieved; "
            f"{len(latencies)} verified, {lost} not within the wait"
        )
        print("\nbacklog (XADDed, not yet verified), every 10 s from the first XADD:")
        print("| t (s) | XADDed | verified | backlog |\n|---|---|---|---|")
        start, done = published[0].xadd_at, max(verified.values(), default=0.0)
        end = max(done, published[-1].xadd_at)
        t = 0.0
        while True:
            xadded, finished = counts_at(published, verified, start + t)
            print(f"| {t:.0f} | {xadded} | {finished} | {xadded - finished} |")
            if start + t >= end:
                break
            t += SAMPLE_SECONDS
        p50, p95, worst = percentile(latencies, 50), percentile(latencies, 95), max(latencies)
        print("\n| XADD → verified | p50 | p95 | max |\n|---|---|---|---|")
        print(f"| seconds | {p50:.1f} | {p95:.1f} | {worst:.1f} |")
        print(
            f"targets: p50 ≤ {TARGET_P50:g} s, p95 ≤ {TARGET_P95:g} s → "
            f"{'met' if p50 <= TARGET_P50 and p95 <= TARGET_P95 and not lost else 'MISSED'}"
        )
        print(cpu_note)
        self.print_runs(start, len(published))
        return bool(lost) or p50 > TARGET_P50 or p95 > TARGET_P95

    def print_runs(self, start: float, events: int) -> None:
        """Where the export runs of a phase spent their time (their event logs)."""
        from datetime import UTC, datetime

        from dagster import DagsterRunStatus, RunsFilter

        records = self.instance.get_run_records(
            filters=RunsFilter(
                tags={"dlm/trigger": "sensor"},
                statuses=[DagsterRunStatus.SUCCESS],
                created_after=datetime.fromtimestamp(start - 1, UTC),
            )
        )
        rows = [self.run_phases(r.dagster_run.run_id) for r in records]
        if rows:
            print(f"{len(rows)} export runs, {events / len(rows):.1f} events per run; medians (s):")
            print_phase_table(rows, medians_only=True)

    # --- 5: the highest rate that keeps the backlog flat ---

    def measure_ladder(self, rates: Sequence[float], seconds: float, size: int) -> bool:
        print(
            f"\n## the highest steady rate of {size / 1e6:g} MB events ({seconds:.0f} s per step)",
            flush=True,
        )
        rows, best = [], 0.0
        for rate in rates:
            cpu = self.cpu_meter()
            published = self.publish(rate, seconds, size)
            drain_timeout = max(90.0, seconds * 2)
            verified = self.wait_verified(published, timeout=drain_timeout)
            row = step_row(rate, published, verified)
            rows.append(row)
            print(f"  {rate:g}/s: {row['verdict']}; {cpu(len(published))}", flush=True)
            self.print_runs(published[0].xadd_at, len(published))
            if row["verdict"] != "holds":
                break
            best = rate
        print(
            "\n| offered /s | achieved /s | first verified after | mean backlog, 1st → 2nd "
            "half once full | p50 / p95 s | drained after last XADD | verdict |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['rate']:g} | {row['achieved']:.2f} | {row['full after']:.0f} s | "
                f"{row['first']:.1f} → {row['second']:.1f} | {row['p50']:.1f} / "
                f"{row['p95']:.1f} | {row['drained']} | {row['verdict']} |"
            )
        print(
            f"\nhighest steady rate: {best:g} events/s (target ≥ {TARGET_STEADY_RATE:g}) → "
            f"{'met' if best >= TARGET_STEADY_RATE else 'MISSED'}"
        )
        return best < TARGET_STEADY_RATE


def step_row(rate: float, published: list[Published], verified: dict[str, float]) -> dict:
    """Judged once the pipeline is full (from the step's first verification to its
    last XADD): the mean backlog of that window's second half against its first."""
    start, end = published[0].xadd_at, published[-1].xadd_at

    def mean_backlog(a: float, b: float) -> float:
        samples = []
        for t in frange(a, b, 1.0):
            xadded, done = counts_at(published, verified, t)
            samples.append(xadded - done)
        return statistics.mean(samples)

    latencies = [verified[p.ref_id] - p.xadd_at for p in published if p.ref_id in verified]
    drained = len(verified) == len(published)
    full = min(verified.values(), default=end)
    middle = (full + end) / 2
    if end - full < 20:
        first = second = float("nan")
        verdict = "step too short for its latency"
    else:
        first, second = mean_backlog(full, middle), mean_backlog(middle, end)
        flat = second - first < max(1.0, rate)  # less than 1 s of arrivals gained
        verdict = "holds" if flat and drained else "backlog grows"
    return {
        "rate": rate,
        "achieved": (len(published) - 1) / (end - start) if end > start else 0.0,
        "full after": full - start,
        "first": first,
        "second": second,
        "p50": percentile(latencies, 50) if latencies else float("nan"),
        "p95": percentile(latencies, 95) if latencies else float("nan"),
        "drained": f"{max(verified.values()) - end:.0f} s" if drained else "no",
        "verdict": verdict,
    }


def print_phase_table(rows: list[dict[str, float]], medians_only: bool = False) -> None:
    columns = list(rows[0])
    print("| run | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    if not medians_only:
        for n, row in enumerate(rows, 1):
            print(f"| {n} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    medians = {c: statistics.median(r[c] for r in rows) for c in columns}
    print("| median | " + " | ".join(f"{medians[c]:.2f}" for c in columns) + " |")


def stack_cpu(marker: str, *, reaped_only: bool = False) -> float:
    """CPU seconds of the stack's processes (not PostgreSQL's), with their reaped
    children (the run workers); `reaped_only`: those children alone."""
    from dlm_pipelines.dev.processes import marked_pids

    total = 0
    for pid in marked_pids(marker):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile: it is counted in its parent's children
        total += sum(int(f) for f in fields[13 if reaped_only else 11 : 15])
    return total / os.sysconf("SC_CLK_TCK")


def counts_at(
    published: Sequence[Published], verified: dict[str, float], t: float
) -> tuple[int, int]:
    xadded = sum(1 for p in published if p.xadd_at <= t)
    done = sum(1 for p in published if verified.get(p.ref_id, float("inf")) <= t)
    return xadded, done


def frange(a: float, b: float, step: float) -> list[float]:
    values, t = [], a
    while t < b:
        values.append(t)
        t += step
    return values or [a]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q % of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def fmt_list(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)
