"""`dlm mock-prince`: a stand-in for the acquisition software (docs/contracts.md §1).

Like the real producer it writes the whole folder first (every file closed and
fsync'ed, the directories too) and only then announces it with XADD, so the DLM
never sees an event whose data is still being written. Stitch events get a grid
of TIFF tiles, video events a folder of frames, overview events one TIFF file.
With `--malformed` a fraction of the events break the contract on purpose, to
show dead-lettering.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

# What a folder writer returns: local_path, img_count, the metadata document.
Written = tuple[str, int, dict[str, Any]]
EVENT_TYPES = ("stitch", "video", "overview")
# How often each kind occurs when all are asked for: stitching is the daily work.
TYPE_WEIGHTS = {"stitch": 6, "video": 3, "overview": 1}
SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2}
SIZE_UNITS |= {"MB": 1000**2, "MIB": 1024**2, "G": 1000**3, "GB": 1000**3, "GIB": 1024**3}


# --- TIFF ------------------------------------------------------------------------------


def tiff_bytes(width: int, height: int, pixels: bytes) -> bytes:
    """A minimal baseline TIFF: 8-bit grayscale, uncompressed, one strip."""
    if len(pixels) != width * height:
        raise ValueError(f"{len(pixels)} pixel bytes for a {width}x{height} image")
    short, long_, rational = 3, 4, 5
    entry_count = 12
    resolution_at = 8 + 2 + entry_count * 12 + 4
    pixels_at = resolution_at + 16
    entries = [
        (256, long_, width),  # ImageWidth
        (257, long_, height),  # ImageLength
        (258, short, 8),  # BitsPerSample
        (259, short, 1),  # Compression: none
        (262, short, 1),  # PhotometricInterpretation: BlackIsZero
        (273, long_, pixels_at),  # StripOffsets
        (277, short, 1),  # SamplesPerPixel
        (278, long_, height),  # RowsPerStrip
        (279, long_, len(pixels)),  # StripByteCounts
        (282, rational, resolution_at),  # XResolution
        (283, rational, resolution_at + 8),  # YResolution
        (296, short, 1),  # ResolutionUnit: none
    ]
    assert len(entries) == entry_count
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", entry_count))
    for tag, kind, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == short else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    out += struct.pack("<I", 0)  # no next IFD
    out += struct.pack("<IIII", 72, 1, 72, 1)
    return bytes(out) + pixels


def tile_shape(pixel_count: int) -> tuple[int, int]:
    """A 4:3 width × height holding about `pixel_count` pixels (at least 1×1)."""
    width = max(1, round((pixel_count * 4 / 3) ** 0.5))
    return width, max(1, pixel_count // width)


# --- writing the folder durably --------------------------------------------------------


def write_durably(path: Path, content: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(folder: Path, stop_at: Path) -> None:
    """mkdir -p, then fsync every directory whose entries changed, up to `stop_at`."""
    folder.mkdir(parents=True, exist_ok=True)
    current = folder
    while True:
        fsync_dir(current)
        if current == stop_at or current.parent == current:
            break
        current = current.parent


def parse_size(text: str) -> int:
    """'512KiB', '5MB', '1000' → bytes."""
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("BKMGI")
    unit = cleaned[len(number) :]
    if unit not in SIZE_UNITS or not number:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512KiB, 5MB or 1000")
    try:
        return int(float(number) * SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size") from None


# --- events ------------------------------------------------------------------------------


@dataclass
class MockPrince:
    """Writes imaging events' data under `data_root` and returns their stream fields."""

    data_root: Path
    systems: Sequence[str] = ("prince", "tsu-exp002", "tsu-exp003")
    experiments: Sequence[str] = ()
    types: Sequence[str] = EVENT_TYPES
    size: int = 256 * 1024  # bytes of pixels per event
    grid: tuple[int, int] = (3, 3)
    frames: int = 20
    malformed_fraction: float = 0.0
    seed: int | None = None
    rng: random.Random = field(init=False)
    video_count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        if not self.experiments:
            today = datetime.now(UTC)
            self.experiments = [f"{today:%Y%m%d}_Plate{n:03d}" for n in (1, 2, 3)]
        unknown = set(self.types) - set(EVENT_TYPES)
        if unknown or not self.types:
            raise ValueError(f"types must be among {', '.join(EVENT_TYPES)}, got {self.types}")
        if not 0 <= self.malformed_fraction <= 1:
            raise ValueError("malformed fraction must be between 0 and 1")

    def next_event(self, now: datetime | None = None) -> tuple[dict[str, str], bool]:
        """One event, data written first; the flag says whether it is malformed on purpose."""
        if self.rng.random() < self.malformed_fraction:
            return self.malformed_event(now), True
        kind = self.rng.choices(self.types, [TYPE_WEIGHTS[t] for t in self.types])[0]
        return self.valid_event(kind, now), False

    def valid_event(self, kind: str, now: datetime | None = None) -> dict[str, str]:
        now = now or datetime.now(UTC)
        ref_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        system = self.rng.choice(self.systems)
        experiment = self.rng.choice(self.experiments)
        stamp = f"{now:%Y%m%d_%H%M%S}_{ref_id[:6]}"
        writer = {"stitch": self._stitch, "video": self._video, "overview": self._overview}[kind]
        local_path, img_count, metadata = writer(system, experiment, stamp, now)
        return {
            "ref_id": ref_id,
            "experiment_id": experiment,
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "type": kind,
            "system": system,
            "local_path": local_path,
            "img_count": str(img_count),
            "metadata": json.dumps(metadata, separators=(",", ":")),
        }

    def _write_images(self, folder: Path, names: list[str]) -> tuple[int, int]:
        """One TIFF per name in `folder`, sharing out `size` bytes of pixels."""
        make_dirs_durably(folder, self.data_root)
        width, height = tile_shape(max(1, self.size // len(names)))
        for name in names:
            write_durably(
                folder / name, tiff_bytes(width, height, self.rng.randbytes(width * height))
            )
        fsync_dir(folder)
        return width, height

    def _stitch(self, system: str, experiment: str, stamp: str, now: datetime) -> Written:
        rows, cols = self.grid
        local_path = f"Images/{experiment}/{stamp}"
        names = [
            f"Img_r{r:02d}_c{c:02d}.tif" for r in range(1, rows + 1) for c in range(1, cols + 1)
        ]
        frame = self._write_images(self.data_root / system / local_path, names)
        focused = now - timedelta(minutes=self.rng.randint(1, 120))
        metadata = self._metadata(system, frame, frame_rate=None)
        metadata["stitching"] = {
            "last_focused_at": focused.isoformat().replace("+00:00", "Z"),
            "grid_size": [rows, cols],
        }
        metadata["video"] = None
        return local_path, len(names), metadata

    def _video(self, system: str, experiment: str, stamp: str, now: datetime) -> Written:
        local_path = f"Video/{experiment}/{stamp}/Img"
        names = [f"Img_{n:05d}.tif" for n in range(1, self.frames + 1)]
        frame = self._write_images(self.data_root / system / local_path, names)
        frame_rate = 20.0
        self.video_count += 1
        metadata = self._metadata(system, frame, frame_rate=frame_rate)
        metadata["video"] = {
            "duration": max(1, round(self.frames / frame_rate)),
            "location": [round(self.rng.uniform(0, 100), 2) for _ in range(3)],
            "magnification": 50.0,
            "vid_type": self.rng.choice(["BRIGHT", "FLUO"]),
            "video_nr": self.video_count,
        }
        return local_path, len(names), metadata

    def _overview(self, system: str, experiment: str, stamp: str, now: datetime) -> Written:
        # An overview is one file: `local_path` names the file, not a folder.
        local_path = f"Images/{experiment}/{stamp}_overview.tif"
        source = self.data_root / system / local_path
        make_dirs_durably(source.parent, self.data_root)
        width, height = tile_shape(self.size)
        write_durably(source, tiff_bytes(width, height, self.rng.randbytes(width * height)))
        fsync_dir(source.parent)
        metadata = self._metadata(system, (width, height), frame_rate=None)
        metadata["stitching"] = None
        metadata["video"] = None
        return local_path, 1, metadata

    def _metadata(
        self, system: str, frame_size: tuple[int, int], frame_rate: float | None
    ) -> dict[str, Any]:
        return {
            "application": {"application": "mock-prince", "version": "v1.0.0", "user": "mock-user"},
            "camera": {
                "model": "Basler acA4112",
                "station_name": system,
                "exposure_time": 0.02,
                "frame_rate": frame_rate,
                "frame_size": list(frame_size),
                "binning": "1x1",
                "gain": 1.0,
                "gamma": 1.0,
                "intensity": [round(self.rng.uniform(0.2, 0.8), 3)],
                "bits_per_pixel": 8,
                "pixel_size": 1.725,
            },
        }

    def malformed_event(self, now: datetime | None = None) -> dict[str, str]:
        """A valid-looking event (no data written) with one contract violation."""
        now = now or datetime.now(UTC)
        ref_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        system = self.rng.choice(self.systems)
        metadata = self._metadata(system, (1, 1), frame_rate=None)
        metadata["stitching"] = {"last_focused_at": None, "grid_size": [1, 1]}
        fields = {
            "ref_id": ref_id,
            "experiment_id": self.rng.choice(self.experiments),
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "type": "stitch",
            "system": system,
            "local_path": f"Images/never-written/{ref_id[:6]}",
            "img_count": "1",
            "metadata": json.dumps(metadata, separators=(",", ":")),
        }
        breakage = self.rng.choice(list(MALFORMATIONS))
        MALFORMATIONS[breakage](fields)
        return fields


def _python_repr_metadata(fields: dict[str, str]) -> None:
    fields["metadata"] = repr(json.loads(fields["metadata"]))


def _naive_timestamp(fields: dict[str, str]) -> None:
    fields["timestamp"] = fields["timestamp"].removesuffix("Z")


# Each breaks one rule of docs/contracts.md §1, as the legacy producers have been seen to.
MALFORMATIONS: dict[str, Callable[[dict[str, str]], None]] = {
    "naive timestamp": _naive_timestamp,
    "upper-case ref_id": lambda f: f.update(ref_id=f["ref_id"].upper()),
    "metadata as a Python repr": _python_repr_metadata,
    "missing img_count": lambda f: f.__delitem__("img_count"),
    "unknown system": lambda f: f.update(system="PRINCE"),
    "escaping local_path": lambda f: f.update(local_path="../../etc"),
    "experiment_id with a slash": lambda f: f.update(experiment_id="exp/a"),
    "unknown type": lambda f: f.update(type="timelapse"),
}


# --- the producer loop -------------------------------------------------------------------


def schedule(interval: float, count: int | None) -> Iterator[float]:
    """Deadlines on a steady grid (writing time does not slow the rate down)."""
    start = time.monotonic()
    n = 0
    while count is None or n < count:
        yield start + n * interval
        n += 1


def produce(
    producer: MockPrince,
    client: Any,
    stream: str,
    *,
    interval: float,
    count: int | None,
    out: IO[str] | None = None,
) -> int:
    """Write and announce events until `count` is reached (forever when None)."""
    sent = 0
    for deadline in schedule(interval, count):
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        fields, malformed = producer.next_event()
        stream_id = client.xadd(stream, fields)
        sent += 1
        what = "MALFORMED" if malformed else fields["type"]
        print(
            f"{stream_id} {what} {fields.get('system')} {fields.get('experiment_id')} "
            f"{fields.get('local_path')}",
            file=out or sys.stdout,
            flush=True,
        )
    return sent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--interval", type=float, help="seconds between events (default 5)")
    pace.add_argument("--rate", type=float, help="events per second")
    parser.add_argument("--count", type=int, default=0, help="events to send; 0 = forever")
    parser.add_argument("--systems", help="comma-separated systems (default: DLM_SYSTEMS)")
    parser.add_argument("--experiments", help="comma-separated experiment ids")
    parser.add_argument("--types", default=",".join(EVENT_TYPES), help="stitch,video,overview")
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("256KiB"), help="pixel bytes per event"
    )
    parser.add_argument("--grid", default="3x3", help="stitch tiles, ROWSxCOLS")
    parser.add_argument("--frames", type=int, default=20, help="frames per video event")
    parser.add_argument(
        "--malformed", type=float, default=0.0, help="fraction of contract-breaking events"
    )
    parser.add_argument("--seed", type=int, help="for a reproducible sequence")
    parser.add_argument("--data-root", type=Path, help="default: DLM_DATA_ROOT")
    parser.add_argument("--redis-url", help="default: DLM_REDIS_URL")
    parser.add_argument("--stream", help="default: DLM_IMAGING_EVENT_STREAM")


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def run(args: argparse.Namespace) -> int:
    import redis

    from dlm_pipelines.settings import get_settings

    settings = get_settings()
    if args.rate is not None and args.rate <= 0:
        raise SystemExit("--rate must be positive")
    interval = 1 / args.rate if args.rate else (args.interval if args.interval is not None else 5)
    try:
        rows, cols = (int(n) for n in args.grid.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--grid {args.grid!r} is not ROWSxCOLS") from None
    producer = MockPrince(
        data_root=(args.data_root or settings.data_root).absolute(),
        systems=_split(args.systems) or settings.systems,
        experiments=_split(args.experiments),
        types=_split(args.types),
        size=args.size,
        grid=(rows, cols),
        frames=args.frames,
        malformed_fraction=args.malformed,
        seed=args.seed,
    )
    client = redis.Redis.from_url(args.redis_url or settings.redis_url, decode_responses=True)
    stream = args.stream or settings.imaging_event_stream
    print(
        f"mock-prince: {stream} on {client.connection_pool.connection_kwargs.get('host')}, "
        f"data under {producer.data_root}, one event every {interval:g}s",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        produce(producer, client, stream, interval=interval, count=args.count or None)
    return 0
