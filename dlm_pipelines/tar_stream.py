"""Stream a source folder as a tar straight into an S3 multipart upload.

One pass over the source bytes, no temporary file: a producer thread writes the
tar (stdlib `tarfile`) into a bounded in-memory pipe, hashing every byte with
sha256 and counting it as it goes; boto3's transfer manager reads the pipe and
uploads parts concurrently (and aborts the multipart upload if anything fails).
Reading, hashing and part uploads overlap; memory stays bounded by the pipe
plus the transfer manager's in-flight parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

TAR_COPY_BUFSIZE = 1 << 20  # read source files in 1 MiB chunks
MAX_PARTS = 9_000  # S3 allows 10,000; keep a margin for the size estimate


@dataclass(frozen=True)
class UploadResult:
    size: int
    sha256: str
    seconds: float


class _Aborted(Exception):
    pass


class _HashingPipe:
    """A bounded, thread-safe byte pipe: `write` on one side, `read` on the other.

    The writer side hashes and counts; `tell` makes it usable as a `tarfile` target.
    """

    def __init__(self, max_buffered: int) -> None:
        self._chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(
            maxsize=max(2, max_buffered // TAR_COPY_BUFSIZE)
        )
        self._pending = bytearray()
        self._eof = False
        self._aborted = threading.Event()
        self.sha256 = hashlib.sha256()
        self.size = 0

    # writer side (the tar producer thread)
    def write(self, data: bytes | bytearray | memoryview) -> int:
        chunk = bytes(data)
        self.sha256.update(chunk)
        self.size += len(chunk)
        self._put(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.size

    def close_writer(self, error: BaseException | None = None) -> None:
        self._put(error)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._aborted.is_set():
            try:
                self._chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        raise _Aborted

    # reader side (boto3's transfer manager)
    def read(self, size: int = -1) -> bytes:
        while not self._eof and (size < 0 or len(self._pending) < size):
            item = self._chunks.get()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                raise item
            else:
                self._pending += item
        if size < 0 or size >= len(self._pending):
            out = bytes(self._pending)
            self._pending.clear()
        else:
            out = bytes(self._pending[:size])
            del self._pending[:size]
        return out

    def abort(self) -> None:
        self._aborted.set()


def estimate_tar_size(source: Path) -> int:
    """Approximate tar size (data plus one header block per member), for part sizing."""
    if source.is_file():
        return source.stat().st_size + 3 * 512
    total = 512
    for root, dirs, files in os.walk(source):
        total += 512 * (len(dirs) + len(files))
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size + 511
    return total + 4096


def part_size_for(estimated_size: int, minimum: int) -> int:
    """The configured part size, grown so that the upload stays under MAX_PARTS."""
    needed = -(-estimated_size // MAX_PARTS)
    mib = 1 << 20
    return max(minimum, -(-needed // mib) * mib)


def write_tar(source: Path, metadata: dict[str, Any], target: Any) -> None:
    """The tar layout of CONTRACTS §3, written to any object with `write` and `tell`.

    A folder gives members `.` and `./<relative path>` (sorted, symlinks stored as
    links, never followed); a single file gives `<file name>`. `./metadata.json`
    (4-space indented JSON) is always the last member.
    """
    with tarfile.TarFile(
        fileobj=target, mode="w", format=tarfile.PAX_FORMAT, copybufsize=TAR_COPY_BUFSIZE
    ) as tar:
        arcname = source.name if source.is_file() else "."
        tar.add(source, arcname=arcname, recursive=True)
        document = json.dumps(metadata, indent=4).encode()
        info = tarfile.TarInfo("./metadata.json")
        info.size = len(document)
        info.mtime = int(time.time())
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(document))


def upload_tar(
    s3_client: Any,
    *,
    source: Path,
    metadata: dict[str, Any],
    bucket: str,
    key: str,
    object_metadata: dict[str, str],
    part_size: int,
    part_concurrency: int,
    on_progress: Callable[[int], None] | None = None,
) -> UploadResult:
    """Tar `source` into `s3://bucket/key`; returns the size and sha256 of the tar.

    On any error the transfer manager aborts the multipart upload, so no partial
    object is left behind.
    """
    started = time.monotonic()
    chunk = part_size_for(estimate_tar_size(source), part_size)
    config = TransferConfig(
        multipart_threshold=chunk,
        multipart_chunksize=chunk,
        max_concurrency=part_concurrency,
        max_io_queue=part_concurrency * 2,
        use_threads=True,
    )
    pipe = _HashingPipe(max_buffered=2 * chunk)

    def produce() -> None:
        try:
            write_tar(source, metadata, pipe)
        except _Aborted:
            return
        except BaseException as exc:  # hand every failure to the reader side
            with contextlib.suppress(_Aborted):
                pipe.close_writer(exc)
            return
        with contextlib.suppress(_Aborted):
            pipe.close_writer()

    producer = threading.Thread(target=produce, name=f"tar:{key}", daemon=True)
    producer.start()
    try:
        s3_client.upload_fileobj(
            pipe,
            bucket,
            key,
            ExtraArgs={"Metadata": object_metadata, "ContentType": "application/x-tar"},
            Config=config,
            Callback=on_progress,
        )
    finally:
        pipe.abort()
        producer.join()
    return UploadResult(
        size=pipe.size, sha256=pipe.sha256.hexdigest(), seconds=time.monotonic() - started
    )
