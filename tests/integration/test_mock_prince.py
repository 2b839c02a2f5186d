"""mock-prince against real Redis: the entries land on the stream, the folders exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlm_pipelines.dev.mock_prince import MockPrince, produce
from dlm_pipelines.events import parse_imaging_event, resolve_source

pytestmark = pytest.mark.integration
SYSTEMS = ("prince", "tsu-exp002", "tsu-exp003")


def test_produce_writes_entries_whose_data_exists(streams, data_root) -> None:
    root = Path(data_root.path)
    fake = MockPrince(data_root=root, systems=SYSTEMS, seed=11, size=20_000, malformed_fraction=0.2)
    sent = produce(fake, streams.client, streams.imaging_event_stream, interval=0.01, count=15)

    entries = streams.client.xrange(streams.imaging_event_stream)
    assert sent == len(entries) == 15
    valid = 0
    for _id, fields in entries:
        if "never-written" in fields.get("local_path", ""):
            continue  # a malformed one
        event = parse_imaging_event(fields, SYSTEMS)
        assert resolve_source(root, event.system, event.local_path).exists()
        valid += 1
    assert 0 < valid < 15


def test_the_command_sends_count_events_at_the_rate(streams, tmp_path: Path) -> None:
    env = {**os.environ, "DLM_DATA_ROOT": str(tmp_path)}
    options = "--count 4 --rate 20 --types video --frames 3 --size 3KB --systems tsu-exp002"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dlm_pipelines.cli",
            "mock-prince",
            *options.split(),
            "--redis-url",
            streams.url,
            "--stream",
            streams.imaging_event_stream,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    entries = streams.client.xrange(streams.imaging_event_stream)
    assert len(entries) == 4
    for _id, fields in entries:
        event = parse_imaging_event(fields, SYSTEMS)
        assert event.system == "tsu-exp002" and event.type.value == "video"
        frames = list(resolve_source(tmp_path, event.system, event.local_path).iterdir())
        assert len(frames) == 3
