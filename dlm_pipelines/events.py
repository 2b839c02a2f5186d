"""The imaging-event contract (docs/contracts.md §1) and the object key derived from it (§3).

`parse_imaging_event` turns one Redis stream entry, exactly as the legacy
producers write it, into an `ImagingEvent`, or raises `InvalidEvent` whose
message says precisely what is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError


class InvalidEvent(ValueError):
    """A stream entry that breaks the contract; the message is the reason."""


class EventType(StrEnum):
    STITCH = "stitch"
    VIDEO = "video"
    OVERVIEW = "overview"

    @property
    def key_prefix(self) -> str:
        """The first segment of the object key (docs/contracts.md §3)."""
        return {"stitch": "images", "video": "videos", "overview": "overview"}[self.value]


# --- the `metadata` JSON document ----------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Application(_Strict):
    application: str
    version: str
    user: str


class Camera(_Strict):
    model: str
    station_name: str
    exposure_time: float
    frame_rate: float | None
    frame_size: tuple[int, int] | None
    binning: str
    gain: float | None
    gamma: float | None
    intensity: list[float]
    bits_per_pixel: float
    pixel_size: float | None = None


class Stitching(_Strict):
    last_focused_at: datetime | None
    grid_size: tuple[int, int]


class Video(_Strict):
    duration: int
    location: tuple[float, float, float]
    magnification: float | None
    vid_type: str | None
    video_nr: int | None


class EventMetadata(_Strict):
    application: Application
    camera: Camera
    stitching: Stitching | None = None
    video: Video | None = None


# --- the event -------------------------------------------------------------------------

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A single, portable path segment: no separators, no leading dot, no spaces.
SAFE_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REQUIRED_FIELDS = ("ref_id", "experiment_id", "timestamp", "local_path", "img_count", "metadata")


class ImagingEvent(BaseModel):
    """One validated imaging event."""

    model_config = ConfigDict(frozen=True)

    ref_id: str
    experiment_id: str
    timestamp: AwareDatetime
    type: EventType
    system: str
    local_path: str
    img_count: int
    metadata: EventMetadata

    @property
    def object_key(self) -> str:
        """`<kind>/<experiment_id>/<YYYYMMDD>/<HHMMSS>.tar`, time in UTC (docs/contracts.md §3)."""
        utc = self.timestamp.astimezone(UTC)
        return f"{self.type.key_prefix}/{self.experiment_id}/{utc:%Y%m%d}/{utc:%H%M%S}.tar"

    @property
    def collision_free_key(self) -> str:
        """The variant used when `object_key` already holds another event's object.

        Same folder, so the tape archiver's glob still finds it; the ref_id makes it
        unique per event and deterministic across retries.
        """
        return self.object_key.removesuffix(".tar") + f"-{self.ref_id}.tar"

    @property
    def partition_date(self) -> str:
        return self.timestamp.astimezone(UTC).date().isoformat()

    def tar_metadata(self) -> dict[str, Any]:
        """The `metadata.json` document stored as the last tar member (docs/contracts.md §3)."""
        return {
            "ref_id": self.ref_id,
            "experiment_id": self.experiment_id,
            "timestamp": self.timestamp.isoformat(),
            "type": self.type.value,
            "system": self.system,
            "schema_version": "1a1",
            "metadata": self.metadata.model_dump(mode="json"),
        }


def _text(fields: Mapping[Any, Any]) -> dict[str, str]:
    """Decode redis-py's bytes (when decode_responses is off) to text."""
    out: dict[str, str] = {}
    for key, value in fields.items():
        k = key.decode() if isinstance(key, bytes) else str(key)
        out[k] = value.decode() if isinstance(value, bytes) else value
    return out


def _describe(error: ValidationError, prefix: str) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(p) for p in item["loc"])
        parts.append(f"{prefix}{location}: {item['msg']}")
    return "; ".join(parts)


def validate_local_path(local_path: str) -> str:
    """Lexical checks of `local_path`; `resolve_source` checks symlinks on disk."""
    if not local_path or local_path.strip() != local_path:
        raise InvalidEvent(
            "local_path: must be a non-empty relative path without surrounding spaces"
        )
    if "\\" in local_path or "\x00" in local_path:
        raise InvalidEvent(f"local_path: {local_path!r} contains a backslash or NUL byte")
    path = PurePosixPath(local_path)
    if path.is_absolute():
        raise InvalidEvent(f"local_path: {local_path!r} is absolute; it must be relative")
    if any(part == ".." for part in path.parts):
        raise InvalidEvent(
            f"local_path: {local_path!r} contains '..' and would escape the data root"
        )
    if path.parts in ((), (".",)):
        raise InvalidEvent(f"local_path: {local_path!r} names the system folder itself")
    return local_path


def parse_imaging_event(fields: Mapping[Any, Any], systems: Collection[str]) -> ImagingEvent:
    """Validate one stream entry against docs/contracts.md §1."""
    data = _text(fields)
    missing = [name for name in REQUIRED_FIELDS if name not in data]
    if missing:
        raise InvalidEvent(f"missing field(s): {', '.join(missing)}")

    ref_id = data["ref_id"]
    if not UUID_RE.match(ref_id):
        raise InvalidEvent(f"ref_id: {ref_id!r} is not a hyphenated lower-case UUID")

    experiment_id = data["experiment_id"]
    if not SAFE_SEGMENT_RE.match(experiment_id):
        raise InvalidEvent(
            f"experiment_id: {experiment_id!r} is not a safe single path segment "
            "(letters, digits, '.', '_', '-'; starting with a letter or digit; at most 128)"
        )

    try:
        timestamp = datetime.fromisoformat(data["timestamp"])
    except ValueError:
        raise InvalidEvent(f"timestamp: {data['timestamp']!r} is not ISO-8601") from None
    if timestamp.tzinfo is None or timestamp.utcoffset() is None:
        raise InvalidEvent(f"timestamp: {data['timestamp']!r} has no timezone (naive)")

    raw_type = data.get("type", EventType.STITCH.value)
    try:
        event_type = EventType(raw_type)
    except ValueError:
        allowed = ", ".join(t.value for t in EventType)
        raise InvalidEvent(f"type: {raw_type!r} is not one of {allowed}") from None

    system = data.get("system", "prince")
    if system not in systems:
        raise InvalidEvent(f"system: {system!r} is not a configured system ({', '.join(systems)})")

    local_path = validate_local_path(data["local_path"])

    img_count_text = data["img_count"]
    if not img_count_text.isdecimal() or not img_count_text.isascii():
        raise InvalidEvent(f"img_count: {img_count_text!r} is not a non-negative decimal integer")

    try:
        metadata_doc = json.loads(data["metadata"])
    except json.JSONDecodeError as exc:
        raise InvalidEvent(
            f"metadata: not a JSON string ({exc.msg} at position {exc.pos})"
        ) from None
    if not isinstance(metadata_doc, dict):
        raise InvalidEvent(f"metadata: must be a JSON object, got {type(metadata_doc).__name__}")
    try:
        metadata = EventMetadata.model_validate(metadata_doc)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc, "metadata.")) from None

    return ImagingEvent(
        ref_id=ref_id,
        experiment_id=experiment_id,
        timestamp=timestamp,
        type=event_type,
        system=system,
        local_path=local_path,
        img_count=int(img_count_text),
        metadata=metadata,
    )


TRASH_FOLDER = ".dlm-trash"  # in each system folder; the purge's own (dlm_pipelines.purger)


def resolve_source(data_root: Path, system: str, local_path: str) -> Path:
    """The event's source on disk, guaranteed to stay inside `<data root>/<system>/`.

    Raises `InvalidEvent` if the path escapes (through `..` or a symlink) and
    `FileNotFoundError` if it does not exist.
    """
    validate_local_path(local_path)
    if PurePosixPath(local_path).parts[0] == TRASH_FOLDER:
        raise InvalidEvent(f"local_path: {local_path!r} is inside the purge's trash")
    system_root = (data_root / system).resolve()
    candidate = system_root / local_path
    resolved = candidate.resolve()
    if resolved == system_root or not resolved.is_relative_to(system_root):
        raise InvalidEvent(
            f"local_path: {local_path!r} resolves to {resolved}, outside {system_root}"
        )
    # No symlink at any level under the system folder: through a linked folder, one
    # event's export or purge would reach another event's data (docs/design.md).
    step = system_root
    for part in PurePosixPath(local_path).parts:
        step = step / part
        if step.is_symlink():
            raise InvalidEvent(f"local_path: {local_path!r} crosses a symlink at {step}")
    if not resolved.exists():
        raise FileNotFoundError(f"source {candidate} does not exist")
    return resolved
