"""`GET /metrics`: the facts of `dlm status` (dlm_pipelines/health.py) for Prometheus.

Computed from the catalog, Redis, the stores and the Dagster instance at each
scrape, so every API worker answers the same. A token is needed like for /api/1
unless DLM_METRICS_ALLOW_ANONYMOUS is true.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dlm_api.deps import ServicesDep, require_metrics_caller
from dlm_pipelines.health import StatusReport, collect, last_successful_run

SCRAPE_TIMEOUT_SECONDS = 2.0  # per store: a scrape must finish within Prometheus' 10 s


class ReportCollector(Collector):
    def __init__(self, report: StatusReport) -> None:
        self.report = report

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self.report
        at = report.at.timestamp()

        def family(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"dlm_{name}", doc, labels=labels)

        events = family("events", "Imaging events in the catalog by status.", ["system", "status"])
        backlog = family(
            "export_backlog_events", "Events not yet verified in S3 (received, exporting, failed).",
            ["system"],
        )  # fmt: skip
        oldest = family(
            "oldest_unexported_event_age_seconds",
            "Age of the oldest event not yet in S3, since DLM received it (0: none).",
            ["system"],
        )
        exported = family("exported_bytes", "Bytes of verified exports in S3.", ["system"])
        purged = family("purged_bytes", "Bytes of local copies deleted by purges.", ["system"])
        free = family("data_root_free_bytes", "Free bytes on the system's data root.", ["system"])
        size = family(
            "data_root_size_bytes", "Size of the system's data root filesystem.", ["system"]
        )
        for s in report.systems:
            for status, count in sorted(s.events.items()):
                events.add_metric([s.system, status], count)
            backlog.add_metric([s.system], s.backlog)
            age = at - s.oldest_unexported.timestamp() if s.oldest_unexported else 0.0
            oldest.add_metric([s.system], age)
            exported.add_metric([s.system], s.exported_bytes)
            purged.add_metric([s.system], s.purged_bytes)
            if s.disk_free_bytes is not None and s.disk_total_bytes is not None:
                free.add_metric([s.system], s.disk_free_bytes)
                size.add_metric([s.system], s.disk_total_bytes)
        yield from (events, backlog, oldest, exported, purged, free, size)

        letters = family(
            "dead_letters", "Messages held in a dead-letter stream or queue.", ["queue"]
        )
        recent = family("dead_letters_last_24h", "Dead letters added in the last 24 h.", ["queue"])
        for d in report.dead_letters:
            letters.add_metric([d.where], d.total)
            if d.last_24h is not None:
                recent.add_metric([d.where], d.last_24h)
        yield from (letters, recent)

        last_purge = family(
            "last_purge_timestamp_seconds",
            "When the last successful purge run ended (0: never).",
            [],
        )
        last_purge.add_metric([], report.last_purge.timestamp() if report.last_purge else 0.0)
        last_reconciliation = family(
            "last_reconciliation_timestamp_seconds",
            "When the last successful reconcile run ended (0: never).",
            [],
        )
        reconciled = report.last_reconciliation
        last_reconciliation.add_metric([], reconciled.timestamp() if reconciled else 0.0)
        up = family("service_up", "1 if the service answered this scrape, 0 if not.", ["service"])
        for service in report.services:
            if service.ok is not None:
                up.add_metric([service.name], 1.0 if service.ok else 0.0)
        attention = family("attention_items", "Things `dlm status` says need attention.", [])
        attention.add_metric([], len(report.attention))
        yield from (last_purge, last_reconciliation, up, attention)


def exposition(report: StatusReport) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(report))
    return generate_latest(registry)


router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_metrics_caller)],
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
        401: {"description": "Missing or invalid bearer token (see DLM_METRICS_ALLOW_ANONYMOUS)."},
    },
)
async def metrics(services: ServicesDep) -> Response:
    instance = services.run_statuses.instance()

    def scrape() -> bytes:
        report = collect(
            services.settings,
            last_successful_run(instance) if instance else lambda _job: None,
            timeout=SCRAPE_TIMEOUT_SECONDS,
        )
        return exposition(report)

    return Response(await run_in_threadpool(scrape), media_type=CONTENT_TYPE_LATEST)
