"""The one `Definitions` object of the DLM code location."""

from __future__ import annotations

from dagster import Definitions

from dlm_pipelines.assets.raw_export import build_raw_export
from dlm_pipelines.catalog import Catalog
from dlm_pipelines.partitions import export_partitions
from dlm_pipelines.resources import DataRoot, ObjectStore, RedisStreams
from dlm_pipelines.sensors.imaging_events import build_imaging_event_sensor
from dlm_pipelines.settings import Settings, get_settings


def build_resources(settings: Settings) -> dict[str, object]:
    return {
        "catalog": Catalog(database_url=settings.database_url),
        "object_store": ObjectStore(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.aws_region,
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
    }


def build_definitions(settings: Settings) -> Definitions:
    partitions_def = export_partitions(settings)
    raw_export = build_raw_export(partitions_def, settings)
    return Definitions(
        assets=[raw_export],
        sensors=[build_imaging_event_sensor(settings, raw_export, partitions_def)],
        resources=build_resources(settings),
    )


defs = build_definitions(get_settings())
