"""Test helpers: imaging events in the legacy wire format, and their source folders."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from tests.conftest import load_fixture

STITCH = load_fixture("imaging_event_stitch.json")


def make_event(
    data_root: Path,
    *,
    system: str = "prince",
    experiment_id: str = "exp-a",
    timestamp: datetime | None = None,
    files: dict[str, bytes] | None = None,
    local_path: str | None = None,
    event_type: str = "stitch",
    write: bool = True,
) -> dict[str, str]:
    """Stream fields exactly as the acquisition software writes them; the folder first."""
    ref_id = str(uuid.uuid4())
    local_path = local_path or f"Images/{ref_id[:8]}"
    if write:
        folder = data_root / system / local_path
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in (files or {"Img_r01_c01.tif": os.urandom(2048)}).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content)
    ts = timestamp or datetime.now(UTC)
    return {
        **STITCH,
        "ref_id": ref_id,
        "experiment_id": experiment_id,
        "timestamp": ts.isoformat().replace("+00:00", "Z"),
        "type": event_type,
        "system": system,
        "local_path": local_path,
        "img_count": str(len(files or {"x": b""})),
    }


def untar(data: bytes) -> dict[str, bytes | None]:
    """Member name → content (None for directories)."""
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member) if member.isfile() else None
            out[member.name] = f.read() if f else None
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {
        "./" + str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_settings(catalog, object_store, streams, data_root, **overrides):
    """Settings pointing at the test's own services (what build_definitions needs)."""
    from dlm_pipelines.settings import Settings

    values = {
        "database_url": catalog.database_url,
        "s3_endpoint_url": object_store.endpoint_url,
        "s3_bucket": object_store.bucket,
        "redis_url": streams.url,
        "imaging_event_stream": streams.imaging_event_stream,
        "export_stream": streams.export_stream,
        "dead_letter_stream": streams.dead_letter_stream,
        "data_root": Path(data_root.path),
        "partition_start_date": "2026-01-01",
        "export_part_size_mib": 5,
        "export_retry_delay_seconds": 0.2,
        # A tick returns at once and a run ends when its work is done, unless a test
        # asks for the waiting sensor or the warm run.
        "sensor_wait_seconds": 0,
        "export_linger_seconds": 0,
        **overrides,
    }
    return Settings(**values)


def run_sensor(defs, instance, name: str = "imaging_event_sensor", cursor: str | None = None):
    """One tick of a sensor against a real instance; returns its SensorResult."""
    from dagster import SensorResult, build_sensor_context

    sensor = defs.resolve_sensor_def(name)
    with build_sensor_context(
        instance=instance, cursor=cursor, resources=defs.resources, definitions=defs
    ) as context:
        result = sensor(context)
    assert isinstance(result, SensorResult), result
    return result


def materialize_partition(defs, instance, partition_key: str, run_config=None, tags=None):
    """Run raw_export (with its resources bound) for one partition, in process."""
    from dagster import materialize

    return materialize(
        [defs.resolve_assets_def("raw_export")],
        partition_key=partition_key,
        run_config=run_config or {},
        instance=instance,
        tags=tags,
        raise_on_error=False,
    )


def materialize_requests(defs, instance, result) -> list:
    return [
        materialize_partition(defs, instance, r.partition_key, r.run_config, r.tags)
        for r in result.run_requests or []
    ]
