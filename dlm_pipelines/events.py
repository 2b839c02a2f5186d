"""The imaging-event contract (docs/contracts.md §1) and the object key derived from it (§3).

`parse_imaging_event` turns one Redis stream entry, exactly as the legacy
producers write it, into an `ImagingEvent`, or raises `InvalidEvent` whose
message says precisely what is wrong. Every field is bounded (docs/design.md,
issue 11): whatever a producer sends either parses into an event the catalog can
store or is rejected here, never an exception from deeper down.

`dead_letter_fields` / `original_fields` keep a rejected entry's fields losslessly
on the (text) dead-letter stream.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
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
KNOWN_FIELDS = frozenset((*REQUIRED_FIELDS, "type", "system"))

# Bounds on what a producer may send (the legacy producers stay far below them).
MAX_FIELDS = 64
MAX_FIELD_BYTES = 64 * 1024  # any field but metadata
MAX_METADATA_BYTES = 1024 * 1024
MAX_LOCAL_PATH_BYTES = 1024
MAX_TIMESTAMP_CHARS = 64
MAX_IMG_COUNT = 2**31 - 1  # imaging_event.img_count is a 32-bit INTEGER
MAX_METADATA_DEPTH = 32
MAX_METADATA_INT = 2**63 - 1  # what every JSON reader can hold exactly
MAX_METADATA_NUMBER_CHARS = 64

FieldPairs = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True)
class TimeWindow:
    """Event timestamps accepted at intake: [earliest, latest], both UTC-aware."""

    earliest: datetime
    latest: datetime

    @classmethod
    def around(cls, first_day: date, now: datetime, max_future: timedelta) -> TimeWindow:
        return cls(datetime.combine(first_day, datetime.min.time(), UTC), now + max_future)


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


def _utf8(raw: bytes | str, what: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"{what}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _text(fields: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> dict[str, str]:
    """The contract's fields as text: each once, UTF-8, within the size bounds.

    Other fields are ignored whatever their bytes (docs/contracts.md §1: unknown fields are
    allowed); the dead letter, if any, still keeps them.
    """
    pairs = list(fields.items()) if isinstance(fields, Mapping) else list(fields)
    if len(pairs) > MAX_FIELDS:
        raise InvalidEvent(f"{len(pairs)} fields; at most {MAX_FIELDS}")
    out: dict[str, str] = {}
    for key, value in pairs:
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if name not in KNOWN_FIELDS:
            continue
        if name in out:
            raise InvalidEvent(f"field {name!r} appears more than once (ambiguous)")
        limit = MAX_METADATA_BYTES if name == "metadata" else MAX_FIELD_BYTES
        if len(value) > limit:
            raise InvalidEvent(f"{name}: {len(value)} bytes; at most {limit}")
        out[name] = _utf8(value, name)
    return out


def _no_constant(name: str) -> Any:
    raise InvalidEvent(f"metadata: {name} is not a finite number")


def _finite_float(text: str) -> float:
    if len(text) > MAX_METADATA_NUMBER_CHARS:
        raise InvalidEvent(f"metadata: number {text[:20]}... is longer than 64 characters")
    value = float(text)
    if not math.isfinite(value):
        raise InvalidEvent(f"metadata: {text} overflows to a non-finite number")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_METADATA_NUMBER_CHARS:
        raise InvalidEvent(f"metadata: integer {text[:20]}... is longer than 64 characters")
    value = int(text)
    if abs(value) > MAX_METADATA_INT:
        raise InvalidEvent(f"metadata: integer {text} is outside the 64-bit range")
    return value


def _check_values(doc: dict[str, Any]) -> None:
    """Depth and string checks over the whole document, iteratively (no recursion).
    json.loads makes exact dicts, lists and strs, so `type() is` picks them."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = [*node.keys(), *node.values()] if type(node) is dict else node
        if children and depth + 1 > MAX_METADATA_DEPTH:
            raise InvalidEvent(f"metadata: nested deeper than {MAX_METADATA_DEPTH} levels")
        for child in children:
            kind = type(child)
            if kind is str:
                # PostgreSQL stores neither NUL nor lone surrogates (UTF-16 halves),
                # exactly the strings UTF-8 cannot encode (checked in C, not per char).
                if "\x00" in child or not (child.isascii() or _encodable(child)):
                    raise InvalidEvent("metadata: a string holds NUL or a lone surrogate")
            elif kind is dict or kind is list:
                stack.append((child, depth + 1))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _deepest_nesting(text: str) -> int:
    """How deep brackets nest in `text` (inside strings too); 0 when it holds too few
    to pass the limit (counted in C, not walked)."""
    if text.count("[") + text.count("{") <= MAX_METADATA_DEPTH * 4:
        return 0  # cannot nest deeper than the limit below: no need to walk it
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _metadata_document(text: str) -> dict[str, Any]:
    # The C scanner recurses per nesting level: count brackets before parsing.
    if _deepest_nesting(text) > MAX_METADATA_DEPTH * 4:  # in strings too: be lenient
        raise InvalidEvent(f"metadata: nested deeper than {MAX_METADATA_DEPTH} levels")
    try:
        doc = json.loads(
            text,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except InvalidEvent:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidEvent(
            f"metadata: not a JSON string ({exc.msg} at position {exc.pos})"
        ) from None
    except (RecursionError, ValueError) as exc:
        raise InvalidEvent(f"metadata: not a usable JSON document ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidEvent(f"metadata: must be a JSON object, got {type(doc).__name__}")
    _check_values(doc)
    return doc


def _timestamp(text: str, window: TimeWindow | None) -> datetime:
    if len(text) > MAX_TIMESTAMP_CHARS:
        raise InvalidEvent(f"timestamp: longer than {MAX_TIMESTAMP_CHARS} characters")
    try:
        timestamp = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidEvent(f"timestamp: {text!r} is not ISO-8601") from None
    if timestamp.tzinfo is None or timestamp.utcoffset() is None:
        raise InvalidEvent(f"timestamp: {text!r} has no timezone (naive)")
    try:
        # Near year 1 or 9999 the UTC instant is not a datetime at all.
        utc = timestamp.astimezone(UTC)
        utc.date() + timedelta(days=1)  # the key and partition arithmetic must work too
    except OverflowError:
        raise InvalidEvent(f"timestamp: {text!r} is at the edge of the calendar") from None
    if window is not None and not window.earliest <= utc <= window.latest:
        raise InvalidEvent(
            f"timestamp: {text!r} is outside the accepted window "
            f"{window.earliest.isoformat()} .. {window.latest.isoformat()} (UTC)"
        )
    return timestamp


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


def parse_imaging_event(
    fields: Mapping[Any, Any] | FieldPairs,
    systems: Collection[str],
    window: TimeWindow | None = None,
) -> ImagingEvent:
    """Validate one stream entry (a mapping, or the raw field pairs) against docs/contracts.md §1.

    `window` bounds the timestamp; without it any calendar date is accepted.
    """
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

    timestamp = _timestamp(data["timestamp"], window)

    raw_type = data.get("type", EventType.STITCH.value)
    try:
        event_type = EventType(raw_type)
    except ValueError:
        allowed = ", ".join(t.value for t in EventType)
        raise InvalidEvent(f"type: {raw_type!r} is not one of {allowed}") from None

    system = data.get("system", "prince")
    if system not in systems:
        raise InvalidEvent(f"system: {system!r} is not a configured system ({', '.join(systems)})")

    if len(data["local_path"].encode()) > MAX_LOCAL_PATH_BYTES:
        raise InvalidEvent(f"local_path: longer than {MAX_LOCAL_PATH_BYTES} bytes")
    local_path = validate_local_path(data["local_path"])

    img_count_text = data["img_count"]
    if (
        not img_count_text.isdecimal()
        or not img_count_text.isascii()
        or len(img_count_text) > 10
        or int(img_count_text) > MAX_IMG_COUNT
    ):
        raise InvalidEvent(
            f"img_count: {img_count_text[:20]!r} is not a non-negative decimal integer "
            f"(at most {MAX_IMG_COUNT})"
        )

    metadata_doc = _metadata_document(data["metadata"])
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


def same_content(a: ImagingEvent, b: ImagingEvent) -> bool:
    """Whether two events with one ref_id say the same thing (the same instant counts)."""
    fields = {"timestamp"}
    return a.timestamp == b.timestamp and a.model_dump(mode="json", exclude=fields) == b.model_dump(
        mode="json", exclude=fields
    )


# --- dead letters ------------------------------------------------------------------------
# The dead-letter stream is text (its readers decode UTF-8), yet must keep whatever
# a producer sent. A field whose value is not UTF-8, or whose name starts with the
# reserved `dlm_`, is stored as `dlm_base64_value:<name>` with its value in base64;
# a field whose name is not UTF-8 as `dlm_base64:<base64 name>`, value in base64.
BASE64_VALUE = "dlm_base64_value:"
BASE64_FIELD = "dlm_base64:"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def dead_letter_fields(pairs: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """An entry's fields in dead-letter form: every byte kept, every field text."""
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            out.append((BASE64_FIELD + _b64(key), _b64(value)))
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or name.startswith("dlm_"):
            out.append((BASE64_VALUE + name, _b64(value)))
        else:
            out.append((name, text))
    return out


def original_fields(letter: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """The producer's fields back from a dead letter (DLM's own `dlm_*` fields dropped)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in letter:
        if name.startswith(BASE64_FIELD):
            out.append((base64.b64decode(name[len(BASE64_FIELD) :]), base64.b64decode(value)))
        elif name.startswith(BASE64_VALUE):
            out.append((name[len(BASE64_VALUE) :].encode(), base64.b64decode(value)))
        elif not name.startswith("dlm_"):
            out.append((name.encode(), value.encode()))
    return out


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
