"""Redis streams: imaging events in, export announcements and dead letters out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import cache

import redis
from dagster import ConfigurableResource

StreamEntry = tuple[str, dict[str, str]]


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)


class RedisStreams(ConfigurableResource):
    url: str
    imaging_event_stream: str = "dlm:new-imaging-event"
    export_stream: str = "dlm:new-export"
    dead_letter_stream: str = "dlm:dead-letter"

    @property
    def client(self) -> redis.Redis:
        return _client(self.url)

    def read_imaging_events(self, after: str, count: int) -> list[StreamEntry]:
        """Up to `count` entries with an id strictly greater than `after`."""
        return list(self.client.xrange(self.imaging_event_stream, min=f"({after}", count=count))

    def first_imaging_event_id(self) -> str | None:
        """The oldest id still in the stream (None when empty)."""
        first = self.client.xrange(self.imaging_event_stream, count=1)
        return first[0][0] if first else None

    def dead_letter(self, source_id: str, fields: Mapping[str, str], reason: str) -> str:
        """Keep a rejected entry: its original fields plus where it came from and why."""
        entry = dict(fields)
        entry.update(
            {
                "dlm_source_stream": self.imaging_event_stream,
                "dlm_source_id": source_id,
                "dlm_reason": reason,
            }
        )
        return str(self.client.xadd(self.dead_letter_stream, entry))

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
