"""Latency through the real process stack, old configuration against new, side by side.

    python -m bench latency [--quick] [--instance=postgres|sqlite|both]
                            [--config=old|new|both] [--duration=S]
                            [--rate=R] [--size=5MB] [--lone=N] [--lone-gap=S] [--cold=N]
                            [--cpu-rate=R] [--cpu-seconds=S] [--cpu-size=2MB]
                            [--step-rates=2,5,8,12,16,20,25] [--step-seconds=S]
                            [--step-size=2MB] [--fixed-runs=N] [--import-reps=N]
                            [--skip-ladder] [--skip-imports] [--compare-instance=FILE]

(Options take the `--name=value` form: `python -m bench` reads bare words as names.)

For each instance storage (`--instance`, default postgres; `both` adds the SQLite
instance of a fresh `DAGSTER_HOME` and doubles the time) it runs the same phases twice,
each time on its own freshly started stack: the OLD configuration (imaging sensor
every 5 s, no wait on the stream, runs that end when their work is done:
`DLM_SENSOR_INTERVAL_SECONDS=5`, `DLM_SENSOR_WAIT_SECONDS=0`,
`DLM_EXPORT_LINGER_SECONDS=0`) and the NEW one (the settings' defaults: sensor every
1 s waiting on the stream, warm runs). A stack is the pieces of `dlm dev` that an
export needs, as real processes (`DevStack`) under a temporary directory: SeaweedFS,
the Dagster daemon and webserver (storage: a temporary PostgreSQL database, or SQLite
under the stack's `DAGSTER_HOME`), the catalog in a temporary PostgreSQL database,
and Redis (`DLM_BENCH_REDIS_URL`, default the local one) with stream names of its
own. Phases, per stack:

1. Dagster's fixed cost per run: trivial runs (`raw_export` on a partition without
   events) submitted through the public GraphQL client, as the UI does; request to
   success, split by the run's own events;
2. **steady**: 5 MB events at 1/s for 300 s (mock-prince's writer: each folder is
   written and fsync'ed before its XADD): p50/p95/max of XADD (the stream id's
   milliseconds) to verified (the catalog's `verified_at`) and the backlog;
3. **lone**: 1 kB events 15 s apart (8 of them): median XADD → verified;
4. **CPU**: 2 MB events at 5/s for 60 s, from the first XADD until every event is
   verified and no export run is alive (a warm run's linger is part of its cost):
   CPU seconds per exported event of the stack's processes (DLM, Dagster's daemon,
   webserver, code servers and run workers, SeaweedFS: every process carrying the
   stack's marker, with its reaped children, from /proc/<pid>/stat) plus PostgreSQL's
   backends serving the bench's two databases (see `PostgresCpu`);
5. **cold**: wait until no export run is alive, then one 1 kB event (5 times): median;
6. **ladder**: 2 MB events at rising rates, 60 s each, stopping at the first that fails:
   a rate holds when, once the pipeline is full (from the step's first verification
   to its last XADD), the mean backlog of that window's second half exceeds its first
   half's by less than one second's worth of events, and the step drains afterwards.

Then one table per instance storage: old, new, new/old and the target of issue 15,
judged on the new configuration (the CPU target: new ≤ 0.5 × old; `--config=new` or
`old` measures one alone, for development). Before the stacks,
the run worker's import with and without compiled bytecode (`--skip-imports`). With
`--compare-instance=FILE` each stack first alternates its daemon between the project's
instance file and FILE (bursts of one small event per system).

About 40 min for `--instance=postgres` on the quiet 2-core machine (the new stack's
ladder and its lingering runs take longest), twice that for `both`. `--quick` (a few
minutes a stack; nothing judged) is a smoke run of the bench itself.

Everything it started is stopped at the end, also on errors, Ctrl-C and SIGTERM, and
the databases and streams are dropped. Exit status 1 when a target is missed (not in
--quick mode).
"""

from __future__ import annotations

import argparse
import math
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
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
# Issue 15's targets, judged on the new configuration.
TARGET_P50 = 2.0
TARGET_P95 = 5.0
TARGET_LONE = 2.5
TARGET_COLD = 4.0
TARGET_STEADY_RATE = 20.0
TARGET_CPU_RATIO = 0.5  # new / old
# The configuration before issue 15; "new" pins the settings' defaults.
OLD_CONFIG = {"sensor_interval_seconds": 5, "sensor_wait_seconds": 0, "export_linger_seconds": 0}
CONFIG_NAMES = ("old", "new")
SAMPLE_SECONDS = 10
LEAD_SECONDS = 3  # writers may run this far ahead of the XADD schedule
EVENTS_PER_WRITER = 6  # one writer does ~9 events/s of 2 MB here (fsync per file)
# The stack's partitions start a week ago: the empty-partition sensor closes the quiet
# days in one tick (from the default start date, a fresh stack spends minutes on it).
# Trivial runs use the first day, which never has events.
START_DAYS_AGO = 7
RUN_WORKER_IMPORT = "import dlm_pipelines.definitions"
PG_SAMPLE_SECONDS = 0.25


def config_settings(name: str) -> dict[str, Any]:
    from dlm_pipelines.settings import Settings

    if name == "old":
        return dict(OLD_CONFIG)
    # Pinned, so that a DLM_* variable in the bench's environment cannot change "new".
    return {key: Settings.model_fields[key].default for key in OLD_CONFIG}


@dataclass(frozen=True)
class Published:
    ref_id: str
    system: str
    xadd_at: float  # epoch seconds, from the stream id

    @classmethod
    def from_entry(cls, stream_id: str, fields: dict[str, str]) -> Published:
        return cls(fields["ref_id"], fields["system"], int(stream_id.split("-")[0]) / 1000)


@dataclass
class Results:
    """One configuration on one instance storage; NaN where a phase did not run."""

    p50: float = math.nan
    p95: float = math.nan
    lost: int = 0
    lone: float = math.nan
    cold: float = math.nan
    rate: float = math.nan
    cpu: float = math.nan  # all processes, s per exported event
    cpu_postgres: float = math.nan
    events_per_run: float = math.nan
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench latency")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--instance",
        choices=("postgres", "sqlite", "both"),
        default="postgres",
        help="Dagster instance storage of the stacks (default postgres)",
    )
    parser.add_argument(
        "--config",
        choices=("old", "new", "both"),
        default="both",
        help="which configuration(s) to measure (default both: the comparison)",
    )
    parser.add_argument("--duration", type=float, help="seconds at --rate (default 300)")
    parser.add_argument("--rate", type=float, default=1.0, help="events/s (default 1)")
    parser.add_argument("--size", default="5MB", help="pixel bytes per event (default 5MB)")
    parser.add_argument("--lone", type=int, help="lone 1 kB events (default 8)")
    parser.add_argument("--lone-gap", type=float, default=15.0, help="s between them (15)")
    parser.add_argument("--cold", type=int, help="cold events (default 5)")
    parser.add_argument("--cpu-rate", type=float, default=5.0, help="events/s (default 5)")
    parser.add_argument("--cpu-seconds", type=float, help="seconds of the CPU phase (60)")
    parser.add_argument("--cpu-size", default="2MB", help="bytes per CPU event (2MB)")
    parser.add_argument("--step-rates", help="events/s of the steps (default 2,5,8,12,16,20,25)")
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
    args.lone = args.lone or (3 if quick else 8)
    args.cold = args.cold or (2 if quick else 5)
    args.cpu_seconds = args.cpu_seconds or (15.0 if quick else 60.0)
    args.step_rates = [
        float(r) for r in (args.step_rates or ("5,20" if quick else "2,5,8,12,16,20,25")).split(",")
    ]
    args.step_seconds = args.step_seconds or (30.0 if quick else 60.0)
    args.fixed_runs = args.fixed_runs or (2 if quick else 5)
    args.import_reps = args.import_reps or (2 if quick else 5)
    args.instances = ["postgres", "sqlite"] if args.instance == "both" else [args.instance]
    args.configs = list(CONFIG_NAMES) if args.config == "both" else [args.config]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from dlm_pipelines.dev.mock_prince import parse_size

    sizes = {k: parse_size(getattr(args, k)) for k in ("size", "cpu_size", "step_size")}
    # SIGTERM unwinds like Ctrl-C: the stack is stopped and the databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="dlm-bench-latency-"))
    began = time.monotonic()
    results: dict[str, dict[str, Results]] = {}
    try:
        print(f"environment: {bytecode_note()}", flush=True)
        if not args.skip_imports:
            compare_imports(scratch, args.import_reps)
        for storage in args.instances:
            results[storage] = {name: Results() for name in CONFIG_NAMES}
            for config in args.configs:
                print(f"\n# {config} configuration, {storage} instance storage", flush=True)
                results[storage][config] = run_phases(scratch, storage, config, args, sizes)
        missed = False
        for storage, by_config in results.items():
            missed |= print_summary(storage, by_config["old"], by_config["new"], args)
        print(
            f"\nall done in {(time.monotonic() - began) / 60:.1f} min; "
            f"load average now {os.getloadavg()[0]:.1f}"
        )
        return 1 if missed and not args.quick else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_phases(
    scratch: Path, storage: str, config: str, args: argparse.Namespace, sizes: dict[str, int]
) -> Results:
    results = Results()
    with running_stack(scratch / f"{storage}-{config}", storage, config) as bench:
        if args.compare_instance:
            bench.compare_instance_files(args.compare_instance, args.fixed_runs)
        bench.measure_fixed_cost(args.fixed_runs)
        bench.measure_steady(args.rate, args.duration, sizes["size"], results)
        bench.measure_lone(args.lone, args.lone_gap, results)
        bench.measure_cpu(args.cpu_rate, args.cpu_seconds, sizes["cpu_size"], results)
        bench.measure_cold(args.cold, results)
        if not args.skip_ladder:
            bench.measure_ladder(args.step_rates, args.step_seconds, sizes["step_size"], results)
    return results


def print_summary(storage: str, old: Results, new: Results, args: argparse.Namespace) -> bool:
    """One table: old, new, their ratio, the target (judged on new). True if missed."""
    print(f"\n## issue 15, {storage} instance storage: old configuration against new")
    print(f"(old: {OLD_CONFIG}; new: the defaults {config_settings('new')})")
    print("| measure | old | new | new / old | target (new) | verdict |")
    print("|---|---|---|---|---|---|")
    missed = False

    def row(name: str, a: float, b: float, target: str, ok: bool | None, unit: str) -> None:
        nonlocal missed
        ratio = b / a if a and not math.isnan(a) and not math.isnan(b) else math.nan
        verdict = "-" if ok is None else ("met" if ok else "MISSED")
        missed |= ok is False
        print(
            f"| {name} | {fmt(a, unit)} | {fmt(b, unit)} | {fmt(ratio, '×')} | {target} | "
            f"{verdict} |"
        )

    steady = f"XADD → verified, {args.size} at {args.rate:g}/s for {args.duration:.0f} s"
    rows: list[tuple[str, float, float, str, bool | None, str]] = [
        (f"{steady}: p50", old.p50, new.p50, f"≤ {TARGET_P50:g} s", new.p50 <= TARGET_P50, "s"),
        (f"{steady}: p95", old.p95, new.p95, f"≤ {TARGET_P95:g} s", new.p95 <= TARGET_P95, "s"),
        (
            f"lone 1 kB events {args.lone_gap:g} s apart: median",
            *(old.lone, new.lone, f"≤ {TARGET_LONE:g} s", new.lone <= TARGET_LONE, "s"),
        ),
        (
            "one 1 kB event, no export run alive (cold): median",
            *(old.cold, new.cold, f"≤ {TARGET_COLD:g} s", new.cold <= TARGET_COLD, "s"),
        ),
    ]
    if not args.skip_ladder:
        rows.append(
            (
                f"highest steady rate, {args.step_size} events, flat backlog",
                *(old.rate, new.rate, f"≥ {TARGET_STEADY_RATE:g}/s"),
                *(new.rate >= TARGET_STEADY_RATE, "/s"),
            )
        )
    cpu_ok = None if math.isnan(old.cpu) else new.cpu <= TARGET_CPU_RATIO * old.cpu
    rows += [
        (
            f"CPU per exported {args.cpu_size} event, all processes ({args.cpu_rate:g}/s)",
            *(old.cpu, new.cpu, f"≤ {TARGET_CPU_RATIO:g} × old", cpu_ok, "s"),
        ),
        ("  of which PostgreSQL's backends", old.cpu_postgres, new.cpu_postgres, "", None, "s"),
        (
            "export runs: events per run (steady)",
            *(old.events_per_run, new.events_per_run, "", None, ""),
        ),
    ]
    for name, a, b, target, ok, unit in rows:
        ok = None if ok is None else ok and not (name.startswith(steady) and new.lost)
        row(name, a, b, target, ok, unit)
    for config, results in (("old", old), ("new", new)):
        for note in results.notes:
            print(f"{config}: {note}")
    if args.quick:
        print("(--quick: a smoke run, nothing judged)")
    return missed


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "×":
        return f"{value:.2f}×"
    if unit == "s":
        return f"{value:.3f} s" if value < 1 else f"{value:.2f} s"
    return f"{value:.1f}{unit}"


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
def running_stack(scratch: Path, storage: str, config: str) -> Iterator[LatencyBench]:
    from dlm_pipelines.catalog import Catalog
    from dlm_pipelines.dev.seaweedfs import free_port_block
    from dlm_pipelines.dev.stack import DevStack
    from dlm_pipelines.settings import Settings
    from tests.postgres import temporary_database

    prefix = f"dlm-bench-latency:{uuid.uuid4().hex[:8]}"
    saved_env = {k: os.environ.get(k) for k in ("DAGSTER_HOME", "DLM_DAGSTER_POSTGRES_URL")}
    with ExitStack() as cleanup:
        cleanup.callback(_restore_env, saved_env)
        catalog_url = cleanup.enter_context(temporary_database(ADMIN_URL, "dlm_bench_catalog"))
        dagster_url = (
            cleanup.enter_context(temporary_database(ADMIN_URL, "dlm_bench_dagster"))
            if storage == "postgres"
            else None  # SQLite under the stack's DAGSTER_HOME
        )
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
            partition_start_date=datetime.now(UTC).date() - timedelta(days=START_DAYS_AGO),
            **config_settings(config),
        )
        cleanup.callback(_delete_streams, settings)
        postgres_cpu = PostgresCpu(
            ADMIN_URL, [u.rsplit("/", 1)[1] for u in (catalog_url, dagster_url) if u]
        )
        cleanup.enter_context(postgres_cpu)
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
        if dagster_url:
            os.environ["DLM_DAGSTER_POSTGRES_URL"] = dagster_url
        else:
            os.environ.pop("DLM_DAGSTER_POSTGRES_URL", None)
        bench = LatencyBench(stack, Catalog(database_url=catalog_url), postgres_cpu)
        cleanup.callback(bench.instance.dispose)
        bench.warm_up()
        print(f"\nstack up and exporting after {time.monotonic() - started:.0f} s", flush=True)
        yield bench


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class PostgresCpu:
    """CPU seconds of the PostgreSQL backends serving `databases`, from /proc.

    Backends come and go with their clients (every run worker opens its own), and an
    ended backend's CPU is reaped by the postmaster, which serves everyone on this
    machine. So a thread reads `pg_stat_activity`'s PIDs for the databases every
    0.25 s (its own connection is to the admin database, not counted) and each one's
    utime + stime from /proc/<pid>/stat, keeping the last reading per backend (PID
    and start time). `total()` sums them: a lower bound, short by what a backend used
    after its last reading, and missing backends that lived less than 0.25 s.
    """

    def __init__(self, admin_url: str, databases: Sequence[str]) -> None:
        self.admin_url = admin_url
        self.databases = list(databases)
        self.readings: dict[tuple[int, int], float] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.error: BaseException | None = None
        self.postmaster: int | None = None

    def __enter__(self) -> PostgresCpu:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def total(self) -> float:
        if self.error is not None:
            raise RuntimeError(f"sampling PostgreSQL's backends failed: {self.error}")
        with self.lock:
            return sum(self.readings.values())

    def server_total(self) -> float:
        """CPU seconds of every backend the postmaster has reaped, plus its own: an upper
        bound (the machine's other users too), which counts the backends that lived
        less than a sample (Dagster's PostgreSQL storage opens one per operation)."""
        if self.postmaster is None:
            return math.nan
        fields = Path(f"/proc/{self.postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        query = sa.text("SELECT pid FROM pg_stat_activity WHERE datname = ANY(:names)")
        ticks = os.sysconf("SC_CLK_TCK")
        try:
            with engine.connect() as conn:
                backend = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                parent = Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1]
                self.postmaster = int(parent)  # field 4 of proc(5)
                while not self.stopped.is_set():
                    pids = conn.execute(query, {"names": self.databases}).scalars().all()
                    for pid in pids:
                        try:
                            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
                        except OSError:
                            continue  # ended meanwhile
                        fields = stat.split()
                        # fields[0] is field 3 of proc(5): utime 14, stime 15, starttime 22
                        key = (pid, int(fields[19]))
                        with self.lock:
                            self.readings[key] = (int(fields[11]) + int(fields[12])) / ticks
                    self.stopped.wait(PG_SAMPLE_SECONDS)
        except BaseException as exc:
            self.error = exc
        finally:
            engine.dispose()


@dataclass(frozen=True)
class CpuUse:
    stack: float
    postgres: float
    seconds: float
    roles: dict[str, float] = field(default_factory=dict)
    postgres_server: float = 0.0  # every backend of the server, the machine's too

    @property
    def total(self) -> float:
        return self.stack + self.postgres

    def note(self, events: int) -> str:
        per = f"{self.total / events:.3f} s per event" if events else "no events"
        roles = sorted(self.roles.items(), key=lambda item: -item[1])
        return (
            f"CPU: {self.total:.1f} s ({self.total / self.seconds:.2f} cores over "
            f"{self.seconds:.0f} s, {per}): the stack {self.stack:.1f} s, PostgreSQL "
            f"{self.postgres:.1f} s; load average {os.getloadavg()[0]:.1f}\n"
            f"  by process: {', '.join(f'{k} {v:.1f} s' for k, v in roles)}; "
            f"every PostgreSQL backend of the server (short-lived ones too, and other "
            f"users'): {self.postgres_server:.1f} s"
        )


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
    def __init__(self, stack: DevStack, catalog: Catalog, postgres_cpu: PostgresCpu) -> None:
        import redis
        from dagster import DagsterInstance

        self.stack = stack
        self.catalog = catalog
        self.postgres_cpu = postgres_cpu
        self.recorded: dict[str, float] = {}  # ref_id → when the sensor recorded it
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

        count_writers = max(3, math.ceil(rate / EVENTS_PER_WRITER))
        writers = [threading.Thread(target=write, daemon=True) for _ in range(count_writers)]
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

    def cpu_meter(self) -> Callable[[], CpuUse]:
        """Call the result after a phase: the CPU the stack and PostgreSQL used in it."""
        roles_before = stack_cpu_by_role(self.stack.marker)
        postgres_before = self.postgres_cpu.total()
        server_before = self.postgres_cpu.server_total()
        started = time.monotonic()

        def used() -> CpuUse:
            now = stack_cpu_by_role(self.stack.marker)
            roles = {k: now.get(k, 0.0) - roles_before.get(k, 0.0) for k in {*now, *roles_before}}
            return CpuUse(
                stack=sum(roles.values()),
                postgres=self.postgres_cpu.total() - postgres_before,
                seconds=time.monotonic() - started,
                roles=roles,
                postgres_server=self.postgres_cpu.server_total() - server_before,
            )

        return used

    def publish_one(self, size: int = 1000) -> Published:
        from dlm_pipelines.dev.mock_prince import MockPrince

        producer = MockPrince(self.stack.data_root, systems=tuple(self.settings.systems), size=size)
        fields = producer.valid_event("stitch")
        stream_id = self.redis.xadd(self.settings.imaging_event_stream, fields)
        return Published.from_entry(stream_id, fields)

    def one_event_latency(self) -> tuple[float, float]:
        """XADD → verified, and XADD → recorded in the catalog by the sensor."""
        published = self.publish_one()
        verified = self.wait_verified([published], timeout=240, poll=0.1)
        if not verified:
            raise RuntimeError(f"a 1 kB event was not verified within 240 s: {published}")
        recorded = self.recorded[published.ref_id] - published.xadd_at
        return verified[published.ref_id] - published.xadd_at, recorded

    def wait_verified(
        self, published: Sequence[Published], timeout: float, poll: float = 1.0
    ) -> dict[str, float]:
        """ref_id → verified_at (epoch seconds) for those verified within `timeout`."""
        pending = {p.ref_id for p in published}
        verified: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for record in self.catalog.get_many(sorted(pending)):
                if record.verified_at is not None:
                    verified[record.ref_id] = record.verified_at.timestamp()
                    self.recorded[record.ref_id] = record.received_at.timestamp()
                    pending.discard(record.ref_id)
            if pending:
                self.check_alive()
                time.sleep(poll)
        return verified

    def check_alive(self) -> None:
        broken = self.stack.failed_process()
        if broken is not None:
            raise RuntimeError(f"{broken.name} died; last lines of its log:\n{broken.tail()}")

    def warm_up(self) -> None:
        """One small event through the whole path, and the empty-partition sensor's
        catch-up on a fresh stack (a runless materialisation for each quiet day since
        the start date: minutes of the daemon's work, once) before anything is timed."""
        from dagster import AssetKey

        from dlm_pipelines.catalog import utcnow
        from dlm_pipelines.partitions import days_to_close

        published = self.publish_one()
        if not self.wait_verified([published], timeout=240):
            raise RuntimeError(f"the warm-up event was not verified; logs in {self.stack.logs}")
        closable = days_to_close(None, self.settings.partition_start_date, utcnow(), 10_000)
        if not closable:
            return
        last = {f"{closable[-1].isoformat()}|{system}" for system in self.settings.systems}
        deadline = time.monotonic() + 600
        while not last <= self.instance.get_materialized_partitions(AssetKey("raw_export")):
            if time.monotonic() > deadline:
                raise RuntimeError("the empty-partition sensor did not catch up in 10 min")
            self.check_alive()
            time.sleep(2)

    # --- the fixed cost of a run ---

    def measure_fixed_cost(self, runs: int) -> None:
        from dagster_graphql import DagsterGraphQLClient

        client = DagsterGraphQLClient("127.0.0.1", port_number=self.stack.ui_port)
        systems = list(self.settings.systems)
        trivial_date = self.settings.partition_start_date.isoformat()
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
                    "dagster/partition": f"{trivial_date}|{system}",
                    "dagster/partition/date": trivial_date,
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

    def wait_no_runs(self, timeout: float) -> float:
        """Until no run is queued, starting or running; returns the seconds waited."""
        from dagster import DagsterRunStatus, RunsFilter

        live = [
            DagsterRunStatus.QUEUED,
            DagsterRunStatus.NOT_STARTED,
            DagsterRunStatus.STARTING,
            DagsterRunStatus.STARTED,
        ]
        started = time.monotonic()
        while self.instance.get_run_records(filters=RunsFilter(statuses=live), limit=1):
            if time.monotonic() > started + timeout:
                raise RuntimeError(f"runs still in flight after {timeout:.0f}s")
            self.check_alive()
            time.sleep(0.5)
        return time.monotonic() - started

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

    # --- steady: latency at a steady rate ---

    def measure_steady(self, rate: float, seconds: float, size: int, results: Results) -> None:
        print(
            f"\n## steady: {size / 1e6:g} MB events at {rate:g}/s for {seconds:.0f} s", flush=True
        )
        cpu = self.cpu_meter()
        published = self.publish(rate, seconds, size)
        verified = self.wait_verified(published, timeout=max(120.0, seconds))
        cpu_note = cpu().note(len(verified))
        latencies = [verified[p.ref_id] - p.xadd_at for p in published if p.ref_id in verified]
        lost = len(published) - len(latencies)
        span = published[-1].xadd_at - published[0].xadd_at
        print(
            f"published {len(published)} at {(len(published) - 1) / max(span, 1e-9):.2f}/s "
            f"achieved; {len(latencies)} verified, {lost} not within the wait"
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
        print(f"| seconds | {p50:.2f} | {p95:.2f} | {worst:.2f} |")
        print(self.sensor_lag(published))
        print(cpu_note)
        results.p50, results.p95, results.lost = p50, p95, lost
        results.events_per_run = self.print_runs(start, len(published))
        if lost:
            results.notes.append(f"steady: {lost} event(s) not verified within the wait")

    def sensor_lag(self, published: Sequence[Published]) -> str:
        """XADD → recorded in the catalog: the sensor's share of the latency."""
        lags = [self.recorded[p.ref_id] - p.xadd_at for p in published if p.ref_id in self.recorded]
        if not lags:
            return "XADD → recorded by the sensor: nothing recorded"
        return (
            f"XADD → recorded by the sensor: p50 {percentile(lags, 50):.2f} s, "
            f"p95 {percentile(lags, 95):.2f} s, max {max(lags):.2f} s"
        )

    def print_runs(self, start: float, events: int) -> float:
        """Where the export runs of a phase spent their time (their event logs);
        returns the events per run (a warm run may still be lingering: counted)."""
        from datetime import UTC, datetime

        from dagster import DagsterRunStatus, RunsFilter

        records = self.instance.get_run_records(
            filters=RunsFilter(
                tags={"dlm/trigger": "sensor"},
                created_after=datetime.fromtimestamp(start - 1, UTC),
            )
        )
        if not records:
            return math.nan
        finished = [r for r in records if r.dagster_run.status == DagsterRunStatus.SUCCESS]
        print(
            f"{len(records)} export runs ({len(finished)} finished), "
            f"{events / len(records):.1f} events per run"
        )
        if finished:
            print("medians of the finished ones (s):")
            print_phase_table([self.run_phases(r.dagster_run.run_id) for r in finished], True)
        return events / len(records)

    # --- lone and cold: one small event at a time ---

    def measure_lone(self, count: int, gap: float, results: Results) -> None:
        """1 kB events `gap` seconds apart (XADD to XADD), each waited for."""
        print(f"\n## lone: {count} 1 kB events {gap:g} s apart", flush=True)
        latencies, recorded = [], []
        next_at = time.monotonic()
        for _ in range(count):
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = time.monotonic() + gap
            total, sensed = self.one_event_latency()
            latencies.append(total)
            recorded.append(sensed)
        results.lone = statistics.median(latencies)
        print(f"XADD → verified: median {results.lone:.2f} s ({fmt_list(latencies)})")
        print(f"XADD → recorded by the sensor: {fmt_list(recorded)} s")

    def measure_cold(self, count: int, results: Results) -> None:
        """Wait until no run is alive (a warm run lingers first), then one 1 kB event."""
        print(f"\n## cold: {count} 1 kB events, each when no export run is alive", flush=True)
        latencies, recorded, waited = [], [], []
        linger = self.settings.export_linger_seconds
        for _ in range(count):
            waited.append(self.wait_no_runs(timeout=max(120.0, 3 * linger)))
            total, sensed = self.one_event_latency()
            latencies.append(total)
            recorded.append(sensed)
        results.cold = statistics.median(latencies)
        print(f"XADD → verified: median {results.cold:.2f} s ({fmt_list(latencies)})")
        print(
            f"XADD → recorded by the sensor: {fmt_list(recorded)} s; "
            f"waited for no run alive before each: {fmt_list(waited)} s"
        )

    # --- CPU per exported event ---

    def measure_cpu(self, rate: float, seconds: float, size: int, results: Results) -> None:
        """From the first XADD until all are verified and no run is alive."""
        print(
            f"\n## CPU: {size / 1e6:g} MB events at {rate:g}/s for {seconds:.0f} s, until every "
            "one is verified and no export run is alive",
            flush=True,
        )
        self.wait_no_runs(timeout=max(120.0, 3 * self.settings.export_linger_seconds))
        cpu = self.cpu_meter()
        published = self.publish(rate, seconds, size)
        verified = self.wait_verified(published, timeout=max(120.0, seconds * 2))
        tail = self.wait_no_runs(timeout=max(120.0, 3 * self.settings.export_linger_seconds))
        used = cpu()
        print(f"{len(verified)} of {len(published)} verified; runs ended {tail:.0f} s later")
        print(used.note(len(verified)))
        if verified:
            results.cpu = used.total / len(verified)
            results.cpu_postgres = used.postgres / len(verified)
        if len(verified) < len(published):
            results.notes.append(f"CPU phase: {len(published) - len(verified)} not verified")

    # --- ladder: the highest rate that keeps the backlog flat ---

    def measure_ladder(
        self, rates: Sequence[float], seconds: float, size: int, results: Results
    ) -> None:
        print(
            f"\n## ladder: the highest steady rate of {size / 1e6:g} MB events "
            f"({seconds:.0f} s per step)",
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
            print(f"  {rate:g}/s: {row['verdict']}; {cpu().note(len(verified))}", flush=True)
            print(f"  {self.sensor_lag(published)}")
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
        print(f"\nhighest steady rate: {best:g} events/s")
        results.rate = best


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
    by_role = stack_cpu_by_role(marker)
    return by_role[REAPED] if reaped_only else sum(by_role.values())


REAPED = "ended children"  # reaped by a stack process: run workers that finished
ROLES = (  # (a word of the command line, the role), first match wins
    ("weed", "SeaweedFS"),
    ("dagster-daemon", "daemon"),
    ("dagster-webserver", "webserver"),
    ("api grpc", "code servers"),
    ("spawn_main", "run workers"),
    ("dlm_api", "API"),
)


def stack_cpu_by_role(marker: str) -> dict[str, float]:
    """CPU seconds of the stack's live processes by role, plus what they reaped."""
    from dlm_pipelines.dev.processes import marked_pids

    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = defaultdict(float)
    for pid in marked_pids(marker):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # ended meanwhile: it is counted in its parent's children
        role = next((name for word, name in ROLES if word in command), "other")
        used[role] += (int(fields[11]) + int(fields[12])) / ticks
        used[REAPED] += (int(fields[13]) + int(fields[14])) / ticks
    return used


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
