"""Test helpers: imaging events in the legacy wire format, and their source folders;
an S3 store without conditional writes."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import socket
import tarfile
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import load_fixture

STITCH = load_fixture("imaging_event_stitch.json")


def make_event(
    data_root: Path,
    *,
    system: str = "prince",
    experiment_id: str = "exp-a",
    timestamp: datetime | None = None,
    files: dict[str, bytes] | None = None,
    local_path: str | None = None,
    event_type: str = "stitch",
    write: bool = True,
) -> dict[str, str]:
    """Stream fields exactly as the acquisition software writes them; the folder first."""
    ref_id = str(uuid.uuid4())
    local_path = local_path or f"Images/{ref_id[:8]}"
    if write:
        folder = data_root / system / local_path
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in (files or {"Img_r01_c01.tif": os.urandom(2048)}).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content)
    ts = timestamp or datetime.now(UTC)
    return {
        **STITCH,
        "ref_id": ref_id,
        "experiment_id": experiment_id,
        "timestamp": ts.isoformat().replace("+00:00", "Z"),
        "type": event_type,
        "system": system,
        "local_path": local_path,
        "img_count": str(len(files or {"x": b""})),
    }


def untar(data: bytes) -> dict[str, bytes | None]:
    """Member name → content (None for directories)."""
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member) if member.isfile() else None
            out[member.name] = f.read() if f else None
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {
        "./" + str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_settings(catalog, object_store, streams, data_root, **overrides):
    """Settings pointing at the test's own services (what build_definitions needs)."""
    from dlm_pipelines.settings import Settings

    values = {
        "database_url": catalog.database_url,
        "s3_endpoint_url": object_store.endpoint_url,
        "s3_bucket": object_store.bucket,
        "redis_url": streams.url,
        "imaging_event_stream": streams.imaging_event_stream,
        "export_stream": streams.export_stream,
        "dead_letter_stream": streams.dead_letter_stream,
        "data_root": Path(data_root.path),
        "partition_start_date": "2026-01-01",
        "export_part_size_mib": 5,
        "export_retry_delay_seconds": 0.2,
        # A tick returns at once and a run ends when its work is done, unless a test
        # asks for the waiting sensor or the warm run.
        "sensor_wait_seconds": 0,
        "export_linger_seconds": 0,
        **overrides,
    }
    return Settings(**values)


def run_sensor(defs, instance, name: str = "imaging_event_sensor", cursor: str | None = None):
    """One tick of a sensor against a real instance; returns its SensorResult."""
    from dagster import SensorResult, build_sensor_context

    sensor = defs.resolve_sensor_def(name)
    with build_sensor_context(
        instance=instance, cursor=cursor, resources=defs.resources, definitions=defs
    ) as context:
        result = sensor(context)
    assert isinstance(result, SensorResult), result
    return result


def materialize_partition(defs, instance, partition_key: str, run_config=None, tags=None):
    """Run raw_export (with its resources bound) for one partition, in process."""
    from dagster import materialize

    return materialize(
        [defs.resolve_assets_def("raw_export")],
        partition_key=partition_key,
        run_config=run_config or {},
        instance=instance,
        tags=tags,
        raise_on_error=False,
    )


def materialize_requests(defs, instance, result) -> list:
    return [
        materialize_partition(defs, instance, r.partition_key, r.run_config, r.tags)
        for r in result.run_requests or []
    ]


# --- an S3 store without conditional writes ----------------------------------------------

NOT_IMPLEMENTED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>NotImplemented</Code>"
    b"<Message>A header you provided implies functionality that is not implemented</Message>"
    b"</Error>"
)
CONDITIONAL_HEADERS = ("If-None-Match", "If-Match")
# Headers about one connection, not the request. `Expect: 100-continue` is answered by
# the proxy itself (it has the whole body before it forwards); botocore never signs it.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "upgrade", "expect"}


@contextlib.contextmanager
def hooked(client: Any, event: str, handler: Any) -> Iterator[None]:
    """`handler` on a boto3 client's `event` for the block (botocore's event hooks)."""
    client.meta.events.register(event, handler)
    try:
        yield
    finally:
        client.meta.events.unregister(event, handler)


class NoConditionalWrites(ThreadingHTTPServer):
    """A loopback reverse proxy in front of an S3 store, for a store that lacks
    conditional writes: every request goes upstream unchanged (method, path and query,
    headers including Host, so SigV4 still verifies, and the body as sent), except that
    a request carrying If-None-Match or If-Match gets 501 NotImplemented instead.

    `refused` lists those requests ("METHOD /path?query If-...") so a test can prove
    the fallback was taken. Use as a context manager; `url` is the endpoint to give S3
    clients.
    """

    daemon_threads = True

    def __init__(self, upstream_url: str) -> None:
        upstream = urllib.parse.urlsplit(upstream_url)
        assert upstream.scheme == "http" and upstream.hostname and upstream.port
        self.upstream = (upstream.hostname, upstream.port)
        self.refused: list[str] = []
        self.forwarded = 0
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> NoConditionalWrites:
        threading.Thread(
            target=self.serve_forever, args=(0.05,), name="s3-proxy", daemon=True
        ).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.shutdown()
        self.server_close()
        with self._lock:  # end the kept-alive connections the clients still hold
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def note(self, refused: str | None) -> None:
        with self._lock:
            if refused is None:
                self.forwarded += 1
            else:
                self.refused.append(refused)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; 100 Continue
    server: NoConditionalWrites

    def relay(self) -> None:
        body = self._read_body()
        conditional = [name for name in CONDITIONAL_HEADERS if name in self.headers]
        if conditional:
            self.server.note(f"{self.command} {self.path} {' '.join(conditional)}")
            length = str(len(NOT_IMPLEMENTED))
            headers = [("Content-Type", "application/xml"), ("Content-Length", length)]
            self._answer(501, headers, NOT_IMPLEMENTED)
            return
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=120)
        try:
            # as received: no Host or Accept-Encoding of http.client's own
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            content = response.read()  # de-chunked if the store chunked it
        finally:
            upstream.close()
        headers = [
            (name, value)
            for name, value in response.getheaders()
            if name.lower() not in HOP_BY_HOP | {"transfer-encoding"}
        ]
        if "Content-Length" not in response.headers:  # chunked, or ended by closing
            headers.append(("Content-Length", str(len(content))))
        self.server.note(None)
        self._answer(response.status, headers, content)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = relay

    def _read_body(self) -> bytes:
        """The request body exactly as sent (a chunked one with its chunk framing)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline(65537)
                raw += line
                size = int(line.split(b";", 1)[0], 16)
                if size == 0:
                    break
                raw += self.rfile.read(size + 2)  # the chunk and its CRLF
            while True:  # trailers, then the empty line
                line = self.rfile.readline(65537)
                raw += line
                if line in (b"\r\n", b"\n", b""):
                    return bytes(raw)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, headers: list[tuple[str, str]], content: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def log_message(self, format: str, *args: object) -> None:
        pass
