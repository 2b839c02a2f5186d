"""The one `Definitions` object of the DLM code location."""

from __future__ import annotations

from dagster import Definitions, in_process_executor

from dlm_pipelines.assets.archive_locations import build_tape_archive
from dlm_pipelines.assets.raw_export import build_raw_export
from dlm_pipelines.catalog import Catalog
from dlm_pipelines.jobs import build_purge_job, build_purge_schedule
from dlm_pipelines.partitions import export_partitions
from dlm_pipelines.resources import DataRoot, ObjectStore, RedisStreams
from dlm_pipelines.resources.archive_queue import ArchiveQueue
from dlm_pipelines.sensors.archive_locations import build_archive_sensor
from dlm_pipelines.sensors.imaging_events import build_imaging_event_sensor
from dlm_pipelines.settings import Settings, get_settings


def build_resources(settings: Settings) -> dict[str, object]:
    return {
        "catalog": Catalog(database_url=settings.database_url),
        "object_store": ObjectStore(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.aws_region,
            part_size_mib=settings.export_part_size_mib,
            part_concurrency=settings.export_part_concurrency,
        ),
        "streams": RedisStreams(
            url=settings.redis_url,
            imaging_event_stream=settings.imaging_event_stream,
            export_stream=settings.export_stream,
            dead_letter_stream=settings.dead_letter_stream,
        ),
        "data_root": DataRoot(path=str(settings.data_root.absolute())),
        "archive_queue": ArchiveQueue(
            url=settings.rabbitmq_url,
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
        ],
        jobs=[purge_job],
        schedules=[build_purge_schedule(settings, purge_job)],
        resources=build_resources(settings),
        # One process per run: the export parallelises inside the step, and a
        # subprocess per step would add seconds of fixed cost to every run.
        executor=in_process_executor,
    )


defs = build_definitions(get_settings())
