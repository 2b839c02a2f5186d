"""Redis streams: imaging events in, export announcements and dead letters out."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from functools import cache
from typing import Any

import redis
from dagster import ConfigurableResource

from dlm_pipelines.events import dead_letter_fields

# An imaging-event entry exactly as stored: its id and its (name, value) pairs as
# bytes, in order and with any repeated name kept (docs/design.md, issue 11).
StreamEntry = tuple[str, list[tuple[bytes, bytes]]]


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)


def _raw_entries(response: Any, **_: Any) -> list[StreamEntry]:
    entries = []
    for stream_id, flat in response or []:
        flat = flat or []
        entries.append((stream_id.decode(), list(zip(flat[::2], flat[1::2], strict=True))))
    return entries


@cache
def _bytes_client(url: str) -> redis.Redis:
    """Reads producers' entries undecoded: a non-UTF-8 byte must not fail the XRANGE,
    and redis-py's dict would silently merge repeated field names."""
    client = redis.Redis.from_url(url, decode_responses=False, socket_timeout=10)
    client.set_response_callback("XRANGE", _raw_entries)
    return client


class RedisStreams(ConfigurableResource):
    url: str
    imaging_event_stream: str = "dlm:new-imaging-event"
    export_stream: str = "dlm:new-export"
    dead_letter_stream: str = "dlm:dead-letter"

    @property
    def client(self) -> redis.Redis:
        return _client(self.url)

    def read_imaging_events(self, after: str, count: int) -> list[StreamEntry]:
        """Up to `count` entries with an id strictly greater than `after`, as bytes."""
        client = _bytes_client(self.url)
        return client.xrange(self.imaging_event_stream, min=f"({after}", count=count)

    def max_deleted_imaging_event_id(self) -> str | None:
        """The highest id ever trimmed or deleted from the imaging stream (None when the
        stream does not exist). Read undecoded: XINFO returns entries, in any bytes."""
        try:
            info = _bytes_client(self.url).xinfo_stream(self.imaging_event_stream)
        except redis.ResponseError:  # no such stream; an outage raises
            return None
        deleted = info.get("max-deleted-entry-id")
        return deleted.decode() if isinstance(deleted, bytes) else deleted

    def wait_for_imaging_events(self, after: str, seconds: float) -> bool:
        """Block until an entry with an id greater than `after` exists, at most `seconds`."""
        if seconds <= 0:
            return False
        found = _bytes_client(self.url).xread(
            {self.imaging_event_stream: after}, count=1, block=max(1, int(seconds * 1000))
        )
        return bool(found)

    def first_imaging_event_id(self) -> str | None:
        """The oldest id still in the stream (None when empty)."""
        first = self.client.xrange(self.imaging_event_stream, count=1)
        return first[0][0] if first else None

    def dead_letter(
        self, source_id: str, fields: Iterable[tuple[bytes, bytes]], reason: str
    ) -> str:
        """Keep a rejected entry: its original fields (losslessly, see
        `events.dead_letter_fields`) plus where it came from and why."""
        pairs = [
            *dead_letter_fields(fields),
            ("dlm_source_stream", self.imaging_event_stream),
            ("dlm_source_id", source_id),
            ("dlm_reason", reason),
        ]
        # XADD itself, not xadd(dict): repeated field names stay repeated.
        flat = [part for pair in pairs for part in pair]
        return str(self.client.execute_command("XADD", self.dead_letter_stream, "*", *flat))

    def announce_export(
        self, *, ref_id: str, sha256: str, size: int, key: str, uploaded_at: datetime
    ) -> str:
        """One `dlm:new-export` entry (docs/contracts.md §2); `key` includes the bucket."""
        fields = {
            "ref_id": ref_id,
            "checksum": json.dumps({"hex": sha256, "algorithm": "sha256"}, separators=(",", ":")),
            "size": str(size),
            "key": key,
            "timestamp": uploaded_at.isoformat(),
        }
        return str(self.client.xadd(self.export_stream, fields))
