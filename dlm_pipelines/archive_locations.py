"""Archive locations: what the tape archiver announces (docs/contracts.md §4), parsed.

`parse_archive_message` turns a message body into an `ArchiveMessage`, or raises
`InvalidArchiveMessage` whose text says exactly what is wrong. The catalog records
whole messages (`Catalog.record_archive_messages`); `sensors/archive_locations.py`
takes them from RabbitMQ and acks them once recorded.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from dlm_pipelines.events import SAFE_SEGMENT_RE, EventType

# Fixed forever: archive ids derived from it are stored and served by the API.
ARCHIVE_ID_NAMESPACE = uuid.UUID("5d0f3c2e-8a51-4c1e-9a47-2f6b1d7e3c90")
EVENT_TYPE_BY_KIND = {t.key_prefix: t.value for t in EventType}  # images → stitch, ...
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
NAIVE_DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?$")
PATH_RE = re.compile(r"^(?P<kind>[^/]+)/(?P<experiment_id>[^/]+)/(?P<day>\d{8})\.tar$")
MAX_JOB_ID = 64  # the catalog's column sizes
MAX_KEY = 1024


class InvalidArchiveMessage(ValueError):
    """A message that breaks docs/contracts.md §4; the text is the reason."""


def archive_id(path: str) -> str:
    """The archive's id: the same path gives the same id on every delivery."""
    return str(uuid.uuid5(ARCHIVE_ID_NAMESPACE, path))


@dataclass(frozen=True)
class ArchiveFile:
    path: str
    src_keys: tuple[str, ...]  # bucket-prefixed, duplicates removed, in message order
    event_type: str
    experiment_id: str

    @property
    def id(self) -> str:
        return archive_id(self.path)


@dataclass(frozen=True)
class ArchiveMessage:
    job_id: str
    date: date
    archives: tuple[ArchiveFile, ...]
    document: dict[str, Any]  # the body as sent, kept in archive_job.message


# --- parsing -----------------------------------------------------------------------------


def parse_archive_message(body: bytes | str) -> ArchiveMessage:
    """Validate one message body against docs/contracts.md §4."""
    try:
        # Decoded here: json.loads would guess UTF-16/32 from the bytes.
        document = json.loads(body.decode("utf-8") if isinstance(body, bytes) else body)
    except UnicodeDecodeError as exc:
        raise InvalidArchiveMessage(f"body is not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise InvalidArchiveMessage(
            f"body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(document, dict):
        raise InvalidArchiveMessage(f"body must be a JSON object, got {_kind(document)}")
    missing = [name for name in ("job_id", "date", "archives") if name not in document]
    if missing:
        raise InvalidArchiveMessage(f"missing field(s): {', '.join(missing)}")

    job_id = document["job_id"]
    if not isinstance(job_id, str) or not job_id.strip() or len(job_id) > MAX_JOB_ID:
        raise InvalidArchiveMessage(
            f"job_id: {job_id!r} is not a non-empty string of at most {MAX_JOB_ID} characters"
        )

    archives = document["archives"]
    if not isinstance(archives, list):
        raise InvalidArchiveMessage(f"archives: must be a list, got {_kind(archives)}")
    files = tuple(_parse_archive(item, f"archives[{i}]") for i, item in enumerate(archives))
    seen: dict[str, int] = {}
    for i, archive in enumerate(files):
        if archive.path in seen:
            raise InvalidArchiveMessage(
                f"archives[{i}].path: {archive.path!r} repeats archives[{seen[archive.path]}]"
            )
        seen[archive.path] = i

    return ArchiveMessage(
        job_id=job_id, date=parse_run_date(document["date"]), archives=files, document=document
    )


def parse_run_date(value: object) -> date:
    """`2026-12-01`, or the naive `2026-11-27T00:00:00` of older archivers."""
    if isinstance(value, str):
        try:
            if DATE_RE.match(value):
                return date.fromisoformat(value)
            if NAIVE_DATETIME_RE.match(value):
                return datetime.fromisoformat(value).date()
        except ValueError as exc:
            raise InvalidArchiveMessage(f"date: {value!r} is not a real date ({exc})") from None
    raise InvalidArchiveMessage(
        f"date: {value!r} is neither YYYY-MM-DD nor a naive YYYY-MM-DDTHH:MM:SS"
    )


def _parse_archive(item: object, where: str) -> ArchiveFile:
    if not isinstance(item, dict):
        raise InvalidArchiveMessage(f"{where}: must be an object, got {_kind(item)}")
    missing = [name for name in ("path", "src_keys") if name not in item]
    if missing:
        raise InvalidArchiveMessage(f"{where}: missing field(s): {', '.join(missing)}")

    path = item["path"]
    match = PATH_RE.match(path) if isinstance(path, str) and len(path) <= MAX_KEY else None
    if match is None:
        raise InvalidArchiveMessage(
            f"{where}.path: {path!r} is not <kind>/<experiment_id>/<YYYYMMDD>.tar"
        )
    kind, experiment_id, day = match["kind"], match["experiment_id"], match["day"]
    if kind not in EVENT_TYPE_BY_KIND:
        raise InvalidArchiveMessage(
            f"{where}.path: kind {kind!r} is not one of {', '.join(EVENT_TYPE_BY_KIND)}"
        )
    if not SAFE_SEGMENT_RE.match(experiment_id):
        raise InvalidArchiveMessage(
            f"{where}.path: experiment_id {experiment_id!r} is not a safe single path segment"
        )
    try:
        datetime.strptime(day, "%Y%m%d")
    except ValueError:
        raise InvalidArchiveMessage(f"{where}.path: {day!r} is not a real YYYYMMDD day") from None

    src_keys = item["src_keys"]
    if not isinstance(src_keys, list):
        raise InvalidArchiveMessage(f"{where}.src_keys: must be a list, got {_kind(src_keys)}")
    for i, key in enumerate(src_keys):
        if not isinstance(key, str) or not key or len(key) > MAX_KEY:
            raise InvalidArchiveMessage(
                f"{where}.src_keys[{i}]: {key!r} is not a non-empty key of at most "
                f"{MAX_KEY} characters"
            )
    return ArchiveFile(
        path=path,
        src_keys=tuple(dict.fromkeys(src_keys)),
        event_type=EVENT_TYPE_BY_KIND[kind],
        experiment_id=experiment_id,
    )


def _kind(value: object) -> str:
    names: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), repr(value))
