"""A long export says how far it got at every heartbeat, and keeps each event's throughput."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dlm_pipelines.definitions import build_definitions
from tests.integration.helpers import (
    make_event,
    make_settings,
    materialize_requests,
    run_sensor,
)

pytestmark = pytest.mark.integration
HEARTBEAT = re.compile(
    r"heartbeat: (\d+) of (\d+) event\(s\) done, ([\d,.]+) MiB sent in \d+ s \(([\d.]+) MiB/s\)"
)


def test_heartbeats_show_bytes_rate_and_events_done(
    catalog, object_store, streams, data_root, dagster_instance
) -> None:
    settings = make_settings(
        catalog, object_store, streams, data_root,
        export_heartbeat_seconds=0.1, export_concurrency=1, export_part_concurrency=1,
    )  # fmt: skip
    dlm = build_definitions(settings)
    root = Path(data_root.path)
    big = {f"Img_r01_c{n:02d}.tif": os.urandom(8 << 20) for n in range(4)}  # 32 MiB
    events = [make_event(root, files=big), make_event(root)]
    for fields in events:
        streams.client.xadd(streams.imaging_event_stream, fields)
    (outcome,) = materialize_requests(dlm, dagster_instance, run_sensor(dlm, dagster_instance))
    assert outcome.success

    beats = [
        HEARTBEAT.search(record.user_message)
        for record in dagster_instance.all_logs(outcome.run_id)
        if record.user_message.startswith("heartbeat:")
    ]
    assert beats and all(beats), "every heartbeat has the progress format"
    sent = [float(b.group(3).replace(",", "")) for b in beats if b]
    assert sent == sorted(sent) and sent[-1] > 0, sent  # bytes only grow, and some were sent
    assert all(b.group(2) == "2" for b in beats if b)
    assert any(float(b.group(4)) > 0 for b in beats if b)

    (materialization,) = outcome.asset_materializations_for_node("raw_export")
    rows = {r.data["ref_id"]: r.data for r in materialization.metadata["exports"].value.records}
    assert set(rows) == {e["ref_id"] for e in events}
    large = rows[events[0]["ref_id"]]
    assert large["size"] > 32 << 20 and large["seconds"] > 0
    assert large["MiB/s"] == pytest.approx(large["size"] / 2**20 / large["seconds"], rel=0.01)
