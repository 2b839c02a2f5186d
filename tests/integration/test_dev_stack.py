"""The pieces of `make dev` as real processes: SeaweedFS with its bucket, the embedded
Redis, state kept across restarts, and nothing left running after a stop."""

from __future__ import annotations

import socket
import stat
import sys
import time
from pathlib import Path

import pytest

from dlm_pipelines.dev.probes import rabbitmq_problem
from dlm_pipelines.dev.processes import ManagedProcess, kill_marked, marked_pids
from dlm_pipelines.dev.stack import DevStack
from dlm_pipelines.resources import RedisStreams
from dlm_pipelines.settings import Settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def stack_for(state_dir: Path, redis_url: str) -> DevStack:
    return DevStack(ROOT, state_dir, settings=Settings(redis_url=redis_url), out=sys.stderr)


def test_embedded_redis_and_s3_come_up_and_keep_their_data(tmp_path: Path) -> None:
    redis_url = f"redis://127.0.0.1:{unused_port()}/0"  # nothing answers there
    first = stack_for(tmp_path, redis_url)
    try:
        first.lock()
        first.start_object_store()
        first.start_redis()
        assert first.redis_embedded and first.redis_url == redis_url
        streams = RedisStreams(url=first.redis_url, imaging_event_stream="dev:events")
        ids = [streams.client.xadd("dev:events", {"n": str(n)}) for n in range(3)]
        assert [i for i, _ in streams.read_imaging_events(ids[0], 10)] == ids[1:]
        assert streams.client.xinfo_stream("dev:events")["length"] == 3
        assert streams.first_imaging_event_id() == ids[0]
        with pytest.raises(RuntimeError, match="another dev stack"):
            stack_for(tmp_path, redis_url).lock()
        bucket = first.settings.s3_bucket
        first.s3_client().head_bucket(Bucket=bucket)  # created by the stack
        first.s3_client().put_object(Bucket=bucket, Key="kept.txt", Body=b"still here")
        endpoint = first.seaweedfs.endpoint_url if first.seaweedfs else None
    finally:
        first.stop()
    assert not marked_pids(first.marker)
    credentials = tmp_path / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600

    second = stack_for(tmp_path, redis_url)
    try:
        second.lock()
        second.start_object_store()
        second.start_redis()
        assert second.credentials == first.credentials
        assert second.seaweedfs is not None and second.seaweedfs.endpoint_url == endpoint
        body = second.s3_client().get_object(Bucket=bucket, Key="kept.txt")["Body"]
        assert body.read() == b"still here"
        client = RedisStreams(url=second.redis_url).client
        assert [i for i, _ in client.xrange("dev:events")] == ids
    finally:
        second.stop()
    assert not marked_pids(second.marker)


def test_a_stop_kills_what_a_child_left_behind(tmp_path: Path) -> None:
    marker = str(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "DLM_DEV_STACK_MARKER": marker}
    # the child starts a grandchild in a session of its own, out of the group's reach
    script = "setsid -f sleep 301; exec sleep 300"
    parent = ManagedProcess("parent", ["sh", "-c", script], env, tmp_path / "p.log")
    parent.start()
    try:
        for _ in range(100):
            if sorted(map(command_of, marked_pids(marker))) == ["sleep 300", "sleep 301"]:
                break
            time.sleep(0.1)
        assert sorted(map(command_of, marked_pids(marker))) == ["sleep 300", "sleep 301"]
        parent.stop(timeout=5)
        (escaped,) = marked_pids(marker)
        assert command_of(escaped) == "sleep 301"
        assert kill_marked(marker) == [escaped]
        assert marked_pids(marker) == []
    finally:
        kill_marked(marker)


def test_rabbitmq_is_used_only_when_it_answers() -> None:
    assert rabbitmq_problem("amqp://guest:guest@127.0.0.1:5672/%2F") is None
    reason = rabbitmq_problem(f"amqp://guest:secret@127.0.0.1:{unused_port()}/%2F")
    assert reason is not None and "nothing answers" in reason and "secret" not in reason
    assert rabbitmq_problem(None) == "DLM_RABBITMQ_URL is not set"
