"""Export end to end: legacy events on Redis → sensor → runs → verified tars in S3."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dagster import (
    DagsterInstance,
    SensorResult,
    build_sensor_context,
    materialize,
)

from dlm_pipelines.catalog import Catalog, EventStatus
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.settings import Settings
from tests.integration.helpers import make_event, sha256, tree, untar

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(catalog, object_store, streams, data_root) -> Settings:
    return Settings(
        database_url=catalog.database_url,
        s3_endpoint_url=object_store.endpoint_url,
        s3_bucket=object_store.bucket,
        redis_url=streams.url,
        imaging_event_stream=streams.imaging_event_stream,
        export_stream=streams.export_stream,
        dead_letter_stream=streams.dead_letter_stream,
        data_root=Path(data_root.path),
        partition_start_date="2026-01-01",
        export_part_size_mib=5,
    )


@pytest.fixture
def dlm(settings: Settings):
    defs = build_definitions(settings)
    return defs


def run_sensor(defs, instance: DagsterInstance, cursor: str | None = None) -> SensorResult:
    sensor = defs.get_sensor_def("imaging_event_sensor")
    with build_sensor_context(
        instance=instance, cursor=cursor, resources=defs.resources, definitions=defs
    ) as context:
        result = sensor(context)
    assert isinstance(result, SensorResult)
    return result


def run_requests_materialized(defs, instance, result: SensorResult) -> list:
    raw_export = defs.get_assets_def("raw_export")
    outcomes = []
    for request in result.run_requests or []:
        outcomes.append(
            materialize(
                [raw_export],
                partition_key=request.partition_key,
                run_config=request.run_config,
                resources=defs.resources,
                instance=instance,
                tags=request.tags,
                raise_on_error=False,
            )
        )
    return outcomes


def test_legacy_events_become_verified_tars(
    dlm, dagster_instance, streams, object_store, catalog: Catalog, data_root
) -> None:
    root = Path(data_root.path)
    events = [
        make_event(root, files={"Img_r01_c01.tif": b"a" * 7000, "sub/Img_r01_c02.tif": b"b" * 10}),
        make_event(root, system="tsu-exp002", experiment_id="exp-b"),
        make_event(root, experiment_id="exp-c"),
    ]
    for fields in events:
        streams.client.xadd(streams.imaging_event_stream, fields)

    result = run_sensor(dlm, dagster_instance)
    assert len(result.run_requests) == 2  # two partitions: prince and tsu-exp002 today
    today = datetime.now(UTC).date().isoformat()
    assert {r.partition_key for r in result.run_requests} == {
        f"{today}|prince",
        f"{today}|tsu-exp002",
    }
    assert all(r.tags["dlm/system"] in ("prince", "tsu-exp002") for r in result.run_requests)
    outcomes = run_requests_materialized(dlm, dagster_instance, result)
    assert all(o.success for o in outcomes)

    announced = {
        fields["ref_id"]: fields for _, fields in streams.client.xrange(streams.export_stream)
    }
    assert set(announced) == {e["ref_id"] for e in events}
    for fields in events:
        record = catalog.get(fields["ref_id"])
        assert record is not None and record.status == EventStatus.VERIFIED
        body = object_store.client.get_object(Bucket=object_store.bucket, Key=record.object_key)[
            "Body"
        ].read()
        # the bytes untar to exactly the source files plus metadata.json
        members = untar(body)
        source = root / fields["system"] / fields["local_path"]
        files = {name: data for name, data in members.items() if data is not None}
        metadata = json.loads(files.pop("./metadata.json"))
        assert files == tree(source)
        assert list(members)[-1] == "./metadata.json"
        assert metadata["ref_id"] == fields["ref_id"] and metadata["schema_version"] == "1a1"
        assert "local_path" not in metadata and "img_count" not in metadata
        # what dlm:new-export says matches the object
        entry = announced[fields["ref_id"]]
        checksum = json.loads(entry["checksum"])
        assert checksum == {"hex": sha256(body), "algorithm": "sha256"}
        assert int(entry["size"]) == len(body) == record.size
        assert entry["key"] == f"{object_store.bucket}/{record.object_key}"
        assert record.sha256 == sha256(body)
        assert datetime.fromisoformat(entry["timestamp"]).tzinfo is not None
