"""archive_sensor without a broker, and the materialisations it builds from recorded jobs."""

from __future__ import annotations

from datetime import date

from dagster import DefaultSensorStatus, SkipReason, build_sensor_context

from dlm_pipelines.catalog import RecordedArchive, RecordedJob
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.partitions import export_partitions
from dlm_pipelines.sensors.archive_locations import materializations
from dlm_pipelines.settings import Settings


def settings(**changes: object) -> Settings:
    return Settings(database_url="sqlite:///:memory:", partition_start_date="2026-01-01", **changes)


def test_unset_url_is_a_skip_that_names_the_setting() -> None:
    defs = build_definitions(settings(rabbitmq_url=None))
    sensor = defs.get_sensor_def("archive_sensor")
    assert sensor.default_status == DefaultSensorStatus.RUNNING
    with build_sensor_context(resources=defs.resources, definitions=defs) as context:
        result = sensor(context)
    assert isinstance(result, SkipReason)
    assert "DLM_RABBITMQ_URL is not set" in (result.skip_message or "")


def test_one_materialisation_per_archived_partition_naming_files_and_counts() -> None:
    partitions_def = export_partitions(settings())
    a = RecordedArchive(
        path="images/exp-a/20261130.tar",
        id="a",
        member_count=3,
        by_partition={"2026-11-30|prince": ["r1", "r2"]},
        unmatched_keys=["bucket/images/exp-a/20261130/000000.tar"],
    )
    b = RecordedArchive(
        path="videos/exp-v/20261130.tar",
        id="b",
        member_count=1,
        by_partition={"2026-11-30|prince": ["r3"], "2026-11-30|tsu-exp002": ["r4"]},
        unmatched_keys=[],
    )
    unmatched_only = RecordedArchive("images/exp-x/20261130.tar", "c", 1, {}, ["x/y"])
    jobs = [
        RecordedJob("job-1", date(2026, 12, 1), True, [a, unmatched_only]),
        RecordedJob("job-2", date(2026, 12, 1), True, [b]),
        RecordedJob("job-empty", date(2026, 12, 1), True, []),
    ]
    with build_sensor_context() as context:
        events = materializations(context, jobs, partitions_def)
    by_partition = {e.partition: e for e in events}
    assert set(by_partition) == {"2026-11-30|prince", "2026-11-30|tsu-exp002"}
    prince = by_partition["2026-11-30|prince"]
    assert prince.asset_key.to_user_string() == "tape_archive"
    assert prince.metadata["archive_files"].value == [a.path, b.path]
    assert prince.metadata["member_counts"].value == {a.path: 3, b.path: 1}
    assert prince.metadata["events_archived"].value == 3
    assert prince.metadata["job_ids"].value == ["job-1", "job-2"]
    assert by_partition["2026-11-30|tsu-exp002"].metadata["archive_files"].value == [b.path]


def test_partition_outside_the_definition_is_skipped() -> None:
    partitions_def = export_partitions(settings())
    archive = RecordedArchive("images/e/20261130.tar", "a", 1, {"2026-11-30|gone": ["r"]}, [])
    with build_sensor_context() as context:
        events = materializations(
            context, [RecordedJob("j", date(2026, 12, 1), True, [archive])], partitions_def
        )
    assert events == []
