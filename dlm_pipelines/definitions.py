"""The one `Definitions` object of the DLM code location."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from dagster import Definitions, EnvVar, in_process_executor

from dlm_pipelines.assets.archive_locations import build_tape_archive
from dlm_pipelines.assets.raw_export import build_raw_export
from dlm_pipelines.catalog import Catalog
from dlm_pipelines.jobs import build_purge_job, build_purge_schedule
from dlm_pipelines.partitions import export_partitions
from dlm_pipelines.resources import DataRoot, ObjectStore, RedisStreams
from dlm_pipelines.resources.alerts import Alerts
from dlm_pipelines.resources.archive_queue import ArchiveQueue
from dlm_pipelines.sensors.alerts import build_alert_sensor
from dlm_pipelines.sensors.archive_locations import build_archive_sensor
from dlm_pipelines.sensors.empty_partitions import build_empty_partition_sensor
from dlm_pipelines.sensors.imaging_events import build_imaging_event_sensor
from dlm_pipelines.settings import Settings, get_settings


def from_environment(variable: str, value: str, secret: bool = False) -> str | EnvVar:
    """A URL with a password as resource config that names its variable, not its value.

    Dagster OSS shows every resource's configured values, without a login, on the
    UI's Resources page and in GraphQL: an `EnvVar` shows only `DLM_..._URL`.
    `get_settings` puts `.env` into the environment, so every deployed value is
    there; only Settings built in code (tests, benchmarks) stay literal.
    `secret`: the whole value is one (a webhook URL holds its token in the path).
    """
    hidden = secret or urlsplit(value).password is not None
    return EnvVar(variable) if hidden and os.environ.get(variable) == value else value


def build_resources(settings: Settings) -> dict[str, object]:
    rabbitmq_url = settings.rabbitmq_url
    return {
        "catalog": Catalog(
            database_url=from_environment("DLM_DATABASE_URL", settings.database_url)
        ),
        "object_store": ObjectStore(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.aws_region,
            part_size_mib=settings.export_part_size_mib,
            part_concurrency=settings.export_part_concurrency,
        ),
        "streams": RedisStreams(
            url=from_environment("DLM_REDIS_URL", settings.redis_url),
            imaging_event_stream=settings.imaging_event_stream,
            export_stream=settings.export_stream,
            dead_letter_stream=settings.dead_letter_stream,
        ),
        "data_root": DataRoot(path=str(settings.data_root.absolute())),
        "alert_webhook": Alerts(
            webhook_url=settings.alert_webhook_url
            and from_environment("DLM_ALERT_WEBHOOK_URL", settings.alert_webhook_url, secret=True)
        ),
        "archive_queue": ArchiveQueue(
            url=rabbitmq_url and from_environment("DLM_RABBITMQ_URL", rabbitmq_url),
            queue=settings.archive_queue,
            dead_letter_queue=settings.archive_dead_letter_queue,
        ),
    }


def build_definitions(settings: Settings) -> Definitions:
    partitions_def = export_partitions(settings)
    raw_export = build_raw_export(partitions_def, settings)
    purge_job = build_purge_job(settings)
    return Definitions(
        assets=[raw_export, build_tape_archive(partitions_def)],
        sensors=[
            build_imaging_event_sensor(settings, raw_export, partitions_def),
            build_archive_sensor(settings, partitions_def),
            build_alert_sensor(settings),
            build_empty_partition_sensor(settings),
        ],
        jobs=[purge_job],
        schedules=[build_purge_schedule(settings, purge_job)],
        resources=build_resources(settings),
        # One process per run: the export parallelises inside the step, and a
        # subprocess per step would add seconds of fixed cost to every run.
        executor=in_process_executor,
    )


defs = build_definitions(get_settings())
