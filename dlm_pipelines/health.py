"""The operator's view of DLM: backlog, failures, dead letters, purges, disk, services.

`dlm status` prints it and exits 1 when something needs attention; the API's
`GET /metrics` exports the same facts to Prometheus. Every fact is read from
where it is kept (catalog, Redis, the Dagster instance, the filesystem, the
stores); nothing here changes anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pika
import pika.exceptions
import redis
import sqlalchemy as sa
from botocore.config import Config
from sqlalchemy.engine import Engine

from dlm_pipelines.catalog import EVENTS, EventStatus, get_engine, utcnow
from dlm_pipelines.settings import Settings, hide_password

# Not yet in S3: waiting, in flight, or failed (and to be retried or swept).
BACKLOG = (EventStatus.RECEIVED, EventStatus.EXPORTING, EventStatus.FAILED)
# An event that waited this long for its export means the pipeline is stuck.
BACKLOG_ATTENTION_AGE = timedelta(hours=1)
DEAD_LETTER_WINDOW = timedelta(hours=24)
PURGE_JOB = "purge"
RECONCILE_JOB = "reconcile"  # issue 14 (docs/design.md, "Planned"); not run yet: "never"


@dataclass
class SystemStatus:
    system: str
    events: dict[str, int] = field(default_factory=dict)  # by status
    backlog: int = 0
    oldest_unexported: datetime | None = None  # when DLM received it
    exported_bytes: int = 0
    purged_bytes: int = 0
    disk_path: str | None = None
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None

    @property
    def failed(self) -> int:
        return self.events.get(EventStatus.FAILED, 0)

    @property
    def needs_attention(self) -> int:
        return self.events.get(EventStatus.NEEDS_ATTENTION, 0)


@dataclass
class ServiceCheck:
    name: str
    ok: bool | None  # None: not configured
    detail: str


@dataclass
class DeadLetters:
    where: str
    last_24h: int | None  # None where the store cannot tell (a queue has no timestamps)
    total: int


@dataclass
class StatusReport:
    at: datetime
    systems: list[SystemStatus]
    dead_letters: list[DeadLetters]
    last_purge: datetime | None
    last_reconciliation: datetime | None
    services: list[ServiceCheck]
    min_free_percent: float
    attention: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.attention

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for system, raw in zip(self.systems, out["systems"], strict=True):
            raw["failed"], raw["needs_attention"] = system.failed, system.needs_attention
        out["ok"] = self.ok
        return _isoformat(out)


def _isoformat(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _isoformat(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_isoformat(v) for v in value]
    return value


def catalog_by_system(engine: Engine, systems: list[str]) -> dict[str, SystemStatus]:
    """Counts by status, backlog, oldest unexported, bytes exported and purged: one query."""
    c = EVENTS.c
    in_backlog = c.status.in_([s.value for s in BACKLOG])
    query = sa.select(
        c.system,
        c.status,
        sa.func.count(),
        sa.func.min(sa.case((in_backlog, c.received_at))),
        sa.func.sum(sa.case((c.verified_at.is_not(None), c.size), else_=0)),
        sa.func.sum(sa.func.coalesce(c.bytes_freed, 0)),
    ).group_by(c.system, c.status)
    out = {system: SystemStatus(system) for system in systems}
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    for system, status, count, oldest, exported, purged in rows:
        entry = out.setdefault(system, SystemStatus(system))
        entry.events[status] = count
        if status in BACKLOG:
            entry.backlog += count
        if oldest is not None and (
            entry.oldest_unexported is None or oldest < entry.oldest_unexported
        ):
            entry.oldest_unexported = oldest
        entry.exported_bytes += int(exported or 0)
        entry.purged_bytes += int(purged or 0)
    return out


def read_disks(data_root: Path, systems: dict[str, SystemStatus]) -> None:
    """Free space of each system's folder (or the data root, until the folder exists)."""
    for entry in systems.values():
        path = data_root / entry.system
        if not path.is_dir():
            path = data_root
        try:
            usage = shutil.disk_usage(path)
        except OSError:
            continue  # the data root is not mounted where this runs (an API-only host)
        entry.disk_path = str(path)
        entry.disk_free_bytes, entry.disk_total_bytes = usage.free, usage.total


def stream_dead_letters(client: Any, stream: str, now: datetime) -> DeadLetters:
    """Entries in a Redis dead-letter stream: all, and those added in the last 24 h."""
    since_ms = int((now - DEAD_LETTER_WINDOW).timestamp() * 1000)
    recent, start = 0, f"{since_ms}-0"
    while True:  # dead letters are few; page through them by id
        page = client.xrange(stream, min=start, max="+", count=1000)
        recent += len(page)
        if len(page) < 1000:
            break
        start = f"({page[-1][0]}"
    return DeadLetters(stream, recent, int(client.xlen(stream)))


def check(name: str, probe: Callable[[], str]) -> ServiceCheck:
    """Run one probe; any exception is the service not answering, with its reason."""
    try:
        return ServiceCheck(name, True, probe())
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ServiceCheck(name, False, f"{type(exc).__name__}: {text}")


def judge(report: StatusReport) -> StatusReport:
    """Fill `attention`: each thing an operator must look at, one line each."""
    lines = report.attention
    for s in report.systems:
        if s.failed:
            lines.append(f"{s.system}: {s.failed} event(s) failed to export")
        if s.needs_attention:
            lines.append(f"{s.system}: {s.needs_attention} event(s) need attention")
        if s.oldest_unexported and report.at - s.oldest_unexported > BACKLOG_ATTENTION_AGE:
            lines.append(
                f"{s.system}: oldest unexported event waits since "
                f"{s.oldest_unexported:%Y-%m-%d %H:%M} UTC"
            )
        if s.disk_free_bytes is not None and s.disk_total_bytes:
            percent = 100 * s.disk_free_bytes / s.disk_total_bytes
            if percent < report.min_free_percent:
                lines.append(
                    f"{s.system}: {percent:.1f}% disk free, below DLM_PURGE_MIN_FREE "
                    f"({report.min_free_percent:g}%)"
                )
    for d in report.dead_letters:
        if d.last_24h:
            lines.append(f"{d.where}: {d.last_24h} dead letter(s) in the last 24 h")
        elif d.last_24h is None and d.total:
            lines.append(f"{d.where}: {d.total} dead letter(s) waiting")
    for service in report.services:
        if service.ok is False:
            lines.append(f"{service.name} does not answer: {service.detail}")
    return report


def collect(
    settings: Settings,
    last_success: Callable[[str], datetime | None],
    timeout: float = 5.0,
) -> StatusReport:
    """Everything `dlm status` shows, each store asked once, none waited on for long."""
    at = utcnow()
    systems: dict[str, SystemStatus] = {s: SystemStatus(s) for s in settings.systems}
    dead_letters: list[DeadLetters] = []

    def catalog() -> str:
        systems.update(catalog_by_system(get_engine(settings.database_url), settings.systems))
        return hide_password(settings.database_url)

    def redis_streams() -> str:
        client = redis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )  # fmt: skip
        client.ping()
        dead_letters.append(stream_dead_letters(client, settings.dead_letter_stream, at))
        return hide_password(settings.redis_url)

    def object_store() -> str:
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            config=Config(
                region_name=settings.aws_region,
                s3={"addressing_style": "path"},
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 1},
            ),
        )
        client.head_bucket(Bucket=settings.s3_bucket)
        return f"bucket {settings.s3_bucket} at {settings.s3_endpoint_url or 'AWS'}"

    def rabbitmq() -> str:
        assert settings.rabbitmq_url is not None
        params = pika.URLParameters(settings.rabbitmq_url)
        params.connection_attempts = 1
        params.socket_timeout = params.stack_timeout = timeout
        connection = pika.BlockingConnection(params)
        try:
            queue = settings.archive_dead_letter_queue
            declared = connection.channel().queue_declare(queue, passive=True)
            dead_letters.append(DeadLetters(queue, None, declared.method.message_count))
        except pika.exceptions.ChannelClosedByBroker:
            pass  # the archive sensor declares it on its first tick
        finally:
            if connection.is_open:
                connection.close()
        return hide_password(settings.rabbitmq_url)

    services = [check("catalog", catalog), check("redis", redis_streams)]
    services.append(check("s3", object_store))
    if settings.rabbitmq_url:
        services.append(check("rabbitmq", rabbitmq))
    else:
        services.append(ServiceCheck("rabbitmq", None, "not configured (DLM_RABBITMQ_URL)"))
    read_disks(settings.data_root.absolute(), systems)
    try:
        purged, reconciled = last_success(PURGE_JOB), last_success(RECONCILE_JOB)
    except Exception as exc:  # Dagster's storage down: say so, show the rest
        services.append(ServiceCheck("dagster", False, f"{type(exc).__name__}: {exc}"))
        purged = reconciled = None
    report = StatusReport(
        at=at,
        systems=list(systems.values()),
        dead_letters=dead_letters,
        last_purge=purged,
        last_reconciliation=reconciled,
        services=services,
        min_free_percent=settings.purge_min_free,
    )
    return judge(report)


# --- `dlm status` ----------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _ago(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "-"
    minutes = int((now - at).total_seconds() // 60)
    age = f"{minutes} min" if minutes < 120 else f"{minutes // 60} h"
    return f"{at:%Y-%m-%d %H:%M} UTC ({age} ago)"


def render(report: StatusReport) -> str:
    """The one screen an operator reads."""
    verdict = "all well" if report.ok else f"{len(report.attention)} thing(s) need attention"
    lines = [f"DLM status at {report.at:%Y-%m-%d %H:%M:%S} UTC: {verdict}", ""]
    header = ("system", "backlog", "oldest unexported", "failed", "attention", "exported",
              "purged", "disk free")  # fmt: skip
    rows = [header]
    for s in report.systems:
        free = _bytes(s.disk_free_bytes)
        if s.disk_free_bytes is not None and s.disk_total_bytes:
            free += f" ({100 * s.disk_free_bytes / s.disk_total_bytes:.0f}%)"
        rows.append((s.system, str(s.backlog), _ago(s.oldest_unexported, report.at),
                     str(s.failed), str(s.needs_attention), _bytes(s.exported_bytes),
                     _bytes(s.purged_bytes), free))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [
            c.ljust(w) if i in (0, 2) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    for i, d in enumerate(report.dead_letters or [DeadLetters("-", 0, 0)]):
        label = "dead letters" if i == 0 else ""
        count = (f"{d.last_24h} in the last 24 h ({d.total} in all)" if d.last_24h is not None
                 else f"{d.total} waiting")  # fmt: skip
        lines.append(f"{label:<15} {d.where}: {count}")
    for label, at in (
        ("last purge", report.last_purge),
        ("last reconcile", report.last_reconciliation),
    ):
        lines.append(f"{label:<15} {_ago(at, report.at) if at else 'never'}")
    lines.append("")
    for service in report.services:
        state = {True: "ok", False: "DOWN", None: "--"}[service.ok]
        lines.append(f"{service.name:<9} {state:<5} {service.detail}")
    if report.attention:
        lines += ["", "needs attention:", *(f"  - {line}" for line in report.attention)]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="the same facts as JSON")


def last_successful_run(instance: Any = None) -> Callable[[str], datetime | None]:
    """When the newest successful run of a job ended, per the Dagster instance
    (`instance`, or the one DAGSTER_HOME names, opened for each call)."""

    def find(job_name: str) -> datetime | None:
        from contextlib import nullcontext

        from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

        with nullcontext(instance) if instance is not None else DagsterInstance.get() as dagster:
            records = dagster.get_run_records(
                RunsFilter(job_name=job_name, statuses=[DagsterRunStatus.SUCCESS]), limit=1
            )
        if not records or records[0].end_time is None:
            return None
        return datetime.fromtimestamp(records[0].end_time, UTC)

    return find


def run(args: argparse.Namespace) -> int:
    """`dlm status`: exit 0 when all is well, 1 when something needs attention."""
    from dlm_pipelines.settings import get_settings

    report = collect(get_settings(), last_successful_run())
    print(json.dumps(report.to_json(), indent=2) if args.json else render(report))
    return 0 if report.ok else 1
