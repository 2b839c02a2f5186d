"""Presigned GET URLs, signed across all cores.

boto3 signs locally, but at about half a millisecond of pure Python per URL, and
under the GIL: one API process signs on one core however many threads serve it.
uvicorn's `--workers` share connections, not requests, so a few keep-alive
clients can pin all the signing on one worker. Instead a page's URLs are cut into
chunks and signed by a small process pool: every request can use every core, and
one page needs less than one core's time.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from multiprocessing import get_context
from typing import Any

import boto3
from botocore.config import Config

CHUNK = 100  # URLs per task: large enough that IPC is noise, small enough to spread


@cache
def _client(endpoint_url: str | None, region: str) -> Any:
    # ObjectStore's signing settings (SigV4, path-style), without importing Dagster into
    # every pool process; tests/unit/test_api_presign.py keeps the two in step.
    config = Config(region_name=region, signature_version="s3v4", s3={"addressing_style": "path"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def sign(
    endpoint_url: str | None, region: str, items: list[tuple[str, str]], expires_in: int
) -> list[str]:
    """GET URLs of `(bucket, key)` items, valid for `expires_in` seconds."""
    client = _client(endpoint_url, region)
    return [
        client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_in
        )
        for bucket, key in items
    ]


def _warm(endpoint_url: str | None, region: str) -> None:
    _client(endpoint_url, region)


class Presigner:
    """Signs inline for a few URLs, in the pool for a page of them."""

    def __init__(
        self, endpoint_url: str | None, region: str, expires_in: int, processes: int | None = None
    ) -> None:
        self.endpoint_url = endpoint_url
        self.region = region
        self.expires_in = expires_in
        self.processes = processes or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def one(self, bucket: str, key: str) -> str:
        return sign(self.endpoint_url, self.region, [(bucket, key)], self.expires_in)[0]

    def many(self, items: list[tuple[str, str]]) -> list[str]:
        if len(items) <= CHUNK or self.processes < 2:
            return sign(self.endpoint_url, self.region, items, self.expires_in)
        pool = self.pool()
        chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
        futures = [
            pool.submit(sign, self.endpoint_url, self.region, chunk, self.expires_in)
            for chunk in chunks
        ]
        return [url for future in futures for url in future.result()]

    def pool(self) -> ProcessPoolExecutor:
        """Started on first use (or by `start`); spawned, so no thread state is forked."""
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.processes, mp_context=get_context("spawn"))
            return self._pool

    def start(self) -> None:
        """Start every pool process now, so the first page does not wait for them."""
        if self.processes >= 2:
            pool = self.pool()
            for future in [
                pool.submit(_warm, self.endpoint_url, self.region) for _ in range(self.processes)
            ]:
                future.result()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
