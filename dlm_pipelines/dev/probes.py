"""Does a service answer? Probes the dev stack uses before it relies on one."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from dlm_pipelines.settings import hide_password

LOOPBACK = "127.0.0.1"


def rabbitmq_problem(url: str | None) -> str | None:
    """None when RabbitMQ at `url` accepts a connection, else why the archive sensor idles."""
    if not url:
        return "DLM_RABBITMQ_URL is not set"
    import pika

    params = pika.URLParameters(url)
    params.socket_timeout = 2
    params.connection_attempts = 1
    params.blocked_connection_timeout = 2
    try:
        pika.BlockingConnection(params).close()
    except Exception as exc:
        return f"nothing answers at {hide_password(url)} ({type(exc).__name__} {exc})".strip()
    return None


def http_status(url: str, timeout: float = 2) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def free_port(preferred: int) -> int:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, preferred))
            return preferred
        except OSError:
            probe.bind((LOOPBACK, 0))
            return int(probe.getsockname()[1])
