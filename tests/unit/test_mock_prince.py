"""mock-prince speaks the legacy wire format exactly and writes its data before announcing it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from dlm_pipelines.cli import build_parser
from dlm_pipelines.dev.mock_prince import MALFORMATIONS, MockPrince, parse_size, produce, tiff_bytes
from dlm_pipelines.events import InvalidEvent, parse_imaging_event, resolve_source

SYSTEMS = ("prince", "tsu-exp002", "tsu-exp003")


def read_tiff(data: bytes) -> dict[int, int]:
    """Tag → value of the first IFD (single-value entries), checking the header."""
    assert data[:4] == b"II*\x00"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    tags = {}
    for i in range(count):
        tag, kind, _n, value = struct.unpack_from("<HHII", data, ifd + 2 + 12 * i)
        tags[tag] = value & 0xFFFF if kind == 3 else value
    return tags


def producer(tmp_path: Path, **kwargs) -> MockPrince:
    return MockPrince(data_root=tmp_path, systems=SYSTEMS, seed=7, size=30_000, **kwargs)


def test_tiff_is_a_baseline_grayscale_image() -> None:
    data = tiff_bytes(4, 3, bytes(range(12)))
    tags = read_tiff(data)
    assert (tags[256], tags[257], tags[258], tags[259], tags[262]) == (4, 3, 8, 1, 1)
    # the single strip holds exactly the pixels and ends the file
    assert data[tags[273] : tags[273] + tags[279]] == bytes(range(12))
    assert tags[273] + tags[279] == len(data)
    with pytest.raises(ValueError):
        tiff_bytes(4, 3, b"short")


@pytest.mark.parametrize("kind", ["stitch", "video", "overview"])
def test_every_kind_parses_and_its_data_is_on_disk(tmp_path: Path, kind: str) -> None:
    fields = producer(tmp_path, grid=(2, 3), frames=4).valid_event(kind)

    event = parse_imaging_event(fields, SYSTEMS)
    assert set(fields) == {
        "ref_id",
        "experiment_id",
        "timestamp",
        "type",
        "system",
        "local_path",
        "img_count",
        "metadata",
    }
    assert all(isinstance(v, str) for v in fields.values())
    assert fields["timestamp"].endswith("Z")
    assert fields["metadata"] == json.dumps(json.loads(fields["metadata"]), separators=(",", ":"))
    assert event.type.value == kind
    source = resolve_source(tmp_path, event.system, event.local_path)
    tiffs = sorted(source.rglob("*.tif")) if source.is_dir() else [source]
    assert len(tiffs) == event.img_count
    for tiff in tiffs:
        tags = read_tiff(tiff.read_bytes())
        assert tags[273] + tags[279] == tiff.stat().st_size
    if kind == "stitch":
        assert event.local_path.startswith("Images/")
        assert event.metadata.stitching is not None
        assert event.metadata.stitching.grid_size == (2, 3)
        assert [t.name for t in tiffs][:2] == ["Img_r01_c01.tif", "Img_r01_c02.tif"]
    elif kind == "video":
        assert event.local_path.startswith("Video/") and event.local_path.endswith("/Img")
        assert event.metadata.video is not None and event.img_count == 4
        assert event.metadata.camera.frame_rate == 20.0
    else:
        assert source.is_file() and event.local_path.startswith("Images/")
        assert event.metadata.stitching is None and event.metadata.video is None
    # the pixels add up to about the requested size
    pixels = sum(read_tiff(t.read_bytes())[279] for t in tiffs)
    assert 0.9 * 30_000 <= pixels <= 30_000


def test_a_mixed_sequence_parses_and_spreads_over_systems(tmp_path: Path) -> None:
    fake = producer(tmp_path, grid=(1, 2), frames=2)
    events = [parse_imaging_event(fake.next_event()[0], SYSTEMS) for _ in range(40)]
    assert {e.type.value for e in events} == {"stitch", "video", "overview"}
    assert {e.system for e in events} == set(SYSTEMS)
    assert len({e.ref_id for e in events}) == 40
    assert len({e.local_path for e in events}) == 40


@pytest.mark.parametrize("breakage", sorted(MALFORMATIONS))
def test_each_malformation_is_rejected_by_the_contract(tmp_path: Path, breakage: str) -> None:
    fake = producer(tmp_path)
    fields = fake.valid_event("stitch")
    parse_imaging_event(fields, SYSTEMS)  # valid before
    MALFORMATIONS[breakage](fields)
    with pytest.raises(InvalidEvent):
        parse_imaging_event(fields, SYSTEMS)


def test_malformed_mode_sends_the_requested_fraction_and_writes_no_data(tmp_path: Path) -> None:
    fake = producer(tmp_path, malformed_fraction=0.25, types=["overview"])
    outcomes = [fake.next_event() for _ in range(120)]
    bad = [fields for fields, malformed in outcomes if malformed]
    assert 15 <= len(bad) <= 45
    for fields in bad:
        with pytest.raises(InvalidEvent):
            parse_imaging_event(fields, SYSTEMS)
    for fields, malformed in outcomes:
        if not malformed:
            parse_imaging_event(fields, SYSTEMS)
    assert not list(tmp_path.rglob("never-written"))


class RecordingRedis:
    """Checks, at the moment of XADD, that the announced data is complete on disk."""

    def __init__(self, data_root: Path) -> None:
        self.data_root = data_root
        self.entries: list[dict[str, str]] = []

    def xadd(self, stream: str, fields: dict[str, str]) -> str:
        event = parse_imaging_event(fields, SYSTEMS)
        source = resolve_source(self.data_root, event.system, event.local_path)
        files = list(source.rglob("*.tif")) if source.is_dir() else [source]
        assert len(files) == event.img_count
        for f in files:
            tags = read_tiff(f.read_bytes())
            assert tags[273] + tags[279] == f.stat().st_size
        self.entries.append(fields)
        return f"{len(self.entries)}-0"


def test_the_folder_is_complete_before_the_xadd(tmp_path: Path, capsys) -> None:
    client = RecordingRedis(tmp_path)
    sent = produce(producer(tmp_path), client, "s", interval=0, count=6)
    assert sent == 6 and len(client.entries) == 6
    assert capsys.readouterr().out.count("\n") == 6


def test_sizes_and_options() -> None:
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("5MB") == 5_000_000
    assert parse_size("1000") == 1000
    assert parse_size("1.5 MiB") == 1572864
    for bad in ("lots", "5XB", ""):
        with pytest.raises(Exception, match="size"):
            parse_size(bad)
    args = build_parser().parse_args(["mock-prince", "--rate", "2", "--count", "3"])
    assert (args.rate, args.count, args.interval) == (2.0, 3, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mock-prince", "--rate", "2", "--interval", "1"])
    with pytest.raises(ValueError, match="types"):
        MockPrince(data_root=Path("."), types=["timelapse"])
