"""Stream a source folder as a tar straight into an S3 multipart upload.

A tar that fits in one part goes up as one `PutObject` instead, with its sha256 in
the object's metadata and as the request's checksum (the server checks it): one
request, no multipart upload, no metadata copy afterwards.

One pass over the source bytes, no temporary file. The calling thread writes the
tar (stdlib `tarfile`), reading file data straight into part-sized buffers; each
full buffer is hashed (sha256 of the whole tar, in order, on its own thread) and
uploaded as one part by a small pool of threads while the next buffer fills, so
reading, hashing and part uploads overlap. Buffers are reused: memory stays at
(concurrency + 1) parts whatever the tar's size. Any failure aborts the
multipart upload once the parts in flight are done, so no partial object is left.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import queue
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from dlm_pipelines.manifest import Manifest, ManifestRecorder

TAR_COPY_BUFSIZE = 1 << 20  # read source files in 1 MiB chunks
MAX_PARTS_S3 = 10_000
MAX_PARTS = 9_000  # keep a margin for the size estimate


@dataclass(frozen=True)
class UploadResult:
    size: int
    sha256: str
    seconds: float
    etag: str  # as the completing request returned it
    manifest: Manifest
    # the sha256 is already in the object's metadata (a one-request upload)
    sha256_in_metadata: bool = False


class _MultipartWriter:
    """A write-only file for `tarfile` that becomes an S3 multipart upload.

    Writes fill part-sized buffers; each full buffer is hashed (in order, on one
    thread) and uploaded (on `concurrency` threads) while the next one fills.
    Buffers are reused and at most `concurrency + 1` exist.
    """

    def __init__(
        self,
        client: Any,
        *,
        bucket: str,
        key: str,
        object_metadata: dict[str, str],
        part_size: int,
        concurrency: int,
        on_progress: Callable[[int], None] | None,
        sha256_metadata_key: str | None = None,
    ) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.single_put = False  # True once the whole tar went up as one PutObject
        self._client = client
        self._target = {"Bucket": bucket, "Key": key}
        self._object_metadata = object_metadata
        self._sha256_metadata_key = sha256_metadata_key
        self._part_size = part_size
        self._on_progress = on_progress
        # The request checksums boto3's transfer manager uses: CRC32 per part, checked
        # by the server, unless the client sends checksums only when required.
        when_supported = client.meta.config.request_checksum_calculation == "when_supported"
        self._checksum = {"ChecksumAlgorithm": "CRC32"} if when_supported else {}
        self._parts: list[Future[dict[str, Any]]] = []
        self._failure: BaseException | None = None  # the first part upload that failed
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._buffers_left = concurrency + 1
        self._buffer = self._take_buffer()
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="tar-sha256")
        self._senders = ThreadPoolExecutor(concurrency, thread_name_prefix="tar-part")
        # started with the first full part: a tar that fits in one part never needs one
        self._upload_id: str | None = None

    # the file interface `tarfile` uses
    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        written = 0
        while written < len(view):
            take = min(len(view) - written, self._part_size - self._filled)
            self._view[self._filled : self._filled + take] = view[written : written + take]
            self._filled += take
            written += take
            if self._filled == self._part_size:
                self._send_part()
        self.size += written
        return written

    def tell(self) -> int:
        return self.size

    def write_from(self, source: io.BufferedIOBase, size: int) -> None:
        """Read `size` bytes of `source` straight into the part buffers (`_TarFile`)."""
        left = size
        while left:
            room = min(left, self._part_size - self._filled)
            got = source.readinto(self._view[self._filled : self._filled + room])
            if not got:  # the file shrank while being archived
                raise OSError(f"unexpected end of data in {getattr(source, 'name', source)}")
            self._filled += got
            self.size += got
            left -= got
            if self._filled == self._part_size:
                self._send_part()

    # the upload
    def complete(
        self,
        condition: dict[str, str] | None = None,
        fallback_check: Callable[[], None] | None = None,
    ) -> str:
        """Send the last part and complete the upload; returns the object's ETag.

        `condition`: `IfNoneMatch`/`IfMatch` for the completing request, so the object
        appears only if the key is (still) what the caller expects. `fallback_check`:
        see `upload_tar`.
        """
        if not self._parts and self._sha256_metadata_key is not None:
            return self._put_whole(condition, fallback_check)
        if self._filled or not self._parts:
            self._send_part(last=True)
        wait(self._parts)
        self._raise_failure()
        self._hasher.shutdown()  # every update has run: the sha256 is final
        self._senders.shutdown()
        parts = [part.result() for part in self._parts]
        response = _write(
            self._client.complete_multipart_upload,
            condition,
            fallback_check,
            **self._target,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": parts},
        )
        return str(response["ETag"])

    def _put_whole(
        self, condition: dict[str, str] | None, fallback_check: Callable[[], None] | None
    ) -> str:
        """The whole tar is in the first buffer: one PutObject with its sha256."""
        assert self._sha256_metadata_key is not None
        self._hasher.shutdown()
        self._senders.shutdown()
        body = bytes(self._view[: self._filled])
        self.sha256.update(body)
        digest = self.sha256.digest()
        response = _write(
            self._client.put_object,
            condition,
            fallback_check,
            **self._target,
            Body=body,
            Metadata={**self._object_metadata, self._sha256_metadata_key: digest.hex()},
            ContentType="application/x-tar",
            ChecksumSHA256=base64.b64encode(digest).decode(),  # the server verifies it
        )
        self.single_put = True
        if self._on_progress is not None:
            self._on_progress(len(body))
        return str(response["ETag"])

    def abort(self, failure: BaseException) -> None:
        """Stop, let parts in flight finish, then abort: no part outlives the upload."""
        self._failure = self._failure or failure
        self._senders.shutdown(cancel_futures=True)
        self._hasher.shutdown(cancel_futures=True)
        if self._upload_id is None:  # no multipart upload was started
            return
        try:
            self._client.abort_multipart_upload(**self._target, UploadId=self._upload_id)
        except Exception as exc:  # keep the cause; ObjectStore.abort_incomplete_uploads cleans up
            failure.add_note(f"aborting multipart upload {self._upload_id} failed too: {exc}")

    def _send_part(self, last: bool = False) -> None:
        self._raise_failure()
        number = len(self._parts) + 1
        if self._upload_id is None:
            self._upload_id = self._client.create_multipart_upload(
                **self._target,
                Metadata=self._object_metadata,
                ContentType="application/x-tar",
                **self._checksum,
            )["UploadId"]
        if number > MAX_PARTS_S3:
            raise RuntimeError(f"the tar outgrew {MAX_PARTS_S3} parts of {self._part_size} bytes")
        buffer, filled = self._buffer, self._filled
        # botocore takes bytes or bytearray bodies, not memoryviews: a full part is
        # sent as its buffer, the short last part as a copy.
        body = buffer if filled == len(buffer) else bytes(self._view[:filled])
        hashed = self._hasher.submit(self.sha256.update, body)
        self._parts.append(self._senders.submit(self._upload_part, number, body, buffer, hashed))
        if not last:
            self._buffer = self._take_buffer()
            self._view = memoryview(self._buffer)
            self._filled = 0

    def _upload_part(
        self, number: int, body: bytes | bytearray, buffer: bytearray, hashed: Future[None]
    ) -> dict[str, Any]:
        try:
            if self._failure is not None:
                raise _Aborted
            response = self._client.upload_part(
                **self._target,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
                **self._checksum,
            )
            if self._on_progress is not None:
                self._on_progress(len(body))
        except BaseException as exc:
            if self._failure is None and not isinstance(exc, _Aborted):
                self._failure = exc
            raise
        finally:
            wait([hashed])  # free the buffer once it is both hashed and sent
            self._free.put(buffer)
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if "ChecksumCRC32" in response:
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        return part

    def _take_buffer(self) -> bytearray:
        if self._free.empty() and self._buffers_left:
            self._buffers_left -= 1
            return bytearray(self._part_size)
        buffer = self._free.get()  # every part frees its buffer, even when it fails
        self._raise_failure()
        return buffer

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


class _Aborted(Exception):
    """A part not sent because another one failed first."""


def _write(
    request: Callable[..., Any],
    condition: dict[str, str] | None,
    fallback_check: Callable[[], None] | None,
    **arguments: Any,
) -> Any:
    """The write that makes the object appear, with `condition`. Where the store answers
    NotImplemented to the condition, `fallback_check` (raising if the write must not
    happen) and the same write without it: the upload's parts and body are reused."""
    if not condition:
        return request(**arguments)
    try:
        return request(**arguments, **condition)
    except ClientError as exc:
        if fallback_check is None or exc.response.get("Error", {}).get("Code") != "NotImplemented":
            raise
    fallback_check()
    return request(**arguments)


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


class _TarFile(tarfile.TarFile):
    """`TarFile` with whole-second mtimes; into a `_MultipartWriter`, member data goes
    straight from the source file into the part buffers (no 1 MiB copies in between),
    and no member list is kept (memory stays flat for huge folders). With a
    `recorder`, each member's stat and the sha256 of its bytes (hashed as they are
    read for the tar, no second read) go into the event's manifest.

    Whole seconds, as GNU tar stores them: a fractional mtime costs every member a
    PAX extended header (1 KiB, and a third of the CPU of writing a tar of small
    files). PAX headers still appear where a member needs them (long or non-ASCII
    names, sizes over 8 GiB).
    """

    recorder: ManifestRecorder | None = None

    def gettarinfo(
        self, name: Any = None, arcname: str | None = None, fileobj: Any = None
    ) -> tarfile.TarInfo:
        info = super().gettarinfo(name, arcname, fileobj)
        if info is not None:  # None: a socket or the like, which `add` skips
            info.mtime = int(info.mtime)
            if self.recorder is not None:
                self.recorder.stat(name, info.name)
        return info

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: Any = None) -> None:
        if self.recorder is None:
            return self._addfile(tarinfo, fileobj)
        reader = self.recorder.reader(tarinfo, fileobj)
        self._addfile(tarinfo, reader)
        self.recorder.added(tarinfo, reader)
        return None

    def _addfile(self, tarinfo: tarfile.TarInfo, fileobj: Any = None) -> None:
        target = self.fileobj
        if not isinstance(target, _MultipartWriter):
            return super().addfile(tarinfo, fileobj)
        header = tarinfo.tobuf(self.format, self.encoding, self.errors)
        target.write(header)
        self.offset += len(header)
        if fileobj is not None:
            target.write_from(fileobj, tarinfo.size)
            blocks, remainder = divmod(tarinfo.size, tarfile.BLOCKSIZE)
            if remainder:
                target.write(tarfile.NUL * (tarfile.BLOCKSIZE - remainder))
                blocks += 1
            self.offset += blocks * tarfile.BLOCKSIZE
        return None


def write_tar(
    source: Path,
    metadata: dict[str, Any],
    target: Any,
    recorder: ManifestRecorder | None = None,
) -> None:
    """The tar layout of docs/contracts.md §3, written to any object with `write` and
    `tell`.

    A folder gives members `.` and `./<relative path>` (sorted, symlinks stored as
    links, never followed); a single file gives `<file name>`. `./metadata.json`
    (4-space indented JSON) is always the last member.

    Deterministic (docs/design.md, "Custody"): every header comes from the files or
    the event; metadata.json's mtime is the event's timestamp, so an unchanged tree
    gives the same bytes and the same sha256 again.
    """
    with _TarFile(
        fileobj=target, mode="w", format=tarfile.PAX_FORMAT, copybufsize=TAR_COPY_BUFSIZE
    ) as tar:
        tar.recorder = recorder
        arcname = source.name if source.is_file() else "."
        tar.add(source, arcname=arcname, recursive=True)
        document = json.dumps(metadata, indent=4).encode()
        info = tarfile.TarInfo("./metadata.json")
        info.size = len(document)
        info.mtime = int(datetime.fromisoformat(metadata["timestamp"]).timestamp())
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
    condition: dict[str, str] | None = None,
    fallback_check: Callable[[], None] | None = None,
    sha256_metadata_key: str | None = None,
) -> UploadResult:
    """Tar `source` into `s3://bucket/key`; returns the size, sha256 and ETag of the
    tar and the manifest of what went into it.

    `condition` makes the write conditional (`{"IfNoneMatch": "*"}`: only if the key
    is free). Where the store answers NotImplemented to it, `fallback_check` runs
    right before the same write is made unconditionally (once every part is sent, so
    nothing is sent twice); it raises if the write must not happen. On any error the
    multipart upload is aborted, so no partial object is left behind. With
    `sha256_metadata_key`, a tar no larger than one part goes up as one PutObject
    carrying its sha256 under that metadata key (`sha256_in_metadata`).
    """
    started = time.monotonic()
    writer = _MultipartWriter(
        s3_client,
        bucket=bucket,
        key=key,
        object_metadata=object_metadata,
        part_size=part_size_for(estimate_tar_size(source), part_size),
        concurrency=part_concurrency,
        on_progress=on_progress,
        sha256_metadata_key=sha256_metadata_key,
    )
    recorder = ManifestRecorder()
    try:
        write_tar(source, metadata, writer, recorder)
        etag = writer.complete(condition, fallback_check)
    except BaseException as failure:
        writer.abort(failure)
        raise
    return UploadResult(
        size=writer.size,
        sha256=writer.sha256.hexdigest(),
        seconds=time.monotonic() - started,
        etag=etag,
        manifest=recorder.manifest(),
        sha256_in_metadata=writer.single_put,
    )
