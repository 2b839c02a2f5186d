"""Bounded streams: entries older than DLM_STREAM_RETENTION are trimmed (issue 11).

`XTRIM MINID` drops entries whose id (milliseconds since the epoch) is below a
bound. The imaging stream is trimmed only below the sensor's cursor, so an entry
the sensor has not read yet is never lost to retention.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import redis


def stream_id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def retention_bound(now: datetime, retention: timedelta) -> str:
    """The smallest id kept: everything older than `now - retention` goes."""
    return f"{int((now - retention).timestamp() * 1000)}-0"


def trim_streams(
    client: redis.Redis,
    *,
    imaging_stream: str,
    other_streams: list[str],
    cursor: str,
    now: datetime,
    retention: timedelta,
) -> dict[str, int]:
    """Trim the streams; returns the entries removed per stream."""
    bound = retention_bound(now, retention)
    imaging_bound = min(bound, cursor, key=stream_id_key)  # the cursor's entry stays
    # Exact trims (redis-py's default `~` keeps whole radix-tree nodes): the cost is the
    # entries removed, a tick's worth at a time.
    removed = {
        imaging_stream: int(client.xtrim(imaging_stream, minid=imaging_bound, approximate=False))
    }
    for stream in other_streams:
        removed[stream] = int(client.xtrim(stream, minid=bound, approximate=False))
    return removed
