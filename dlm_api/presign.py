"""Presigned GET URLs (SigV4 query signing), built without botocore's request machinery.

boto3's `generate_presigned_url` costs about 0.3-0.5 ms of pure Python per URL (a
request object, event hooks, endpoint rules, four HMACs for the signing key), so a
page of 500 links was mostly signing. SigV4's signing key depends only on the secret,
the day, the region and the service: it is derived once a day and cached, and each
URL then costs one SHA-256 of its canonical request and one HMAC (a few µs).

The URLs are byte for byte what boto3 makes with ObjectStore's settings (SigV4,
path-style, `UNSIGNED-PAYLOAD`, only `host` signed; tests/unit/test_api_presign.py
compares them). boto3 still resolves the endpoint (once per bucket, from a probe URL)
and the credentials (its standard chain, refreshed when they expire).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import NoCredentialsError

SERVICE = "s3"
ALGORITHM = "AWS4-HMAC-SHA256"
PROBE_KEY = "dlm-presign-probe"
DEFAULT_PORTS = {"http": 80, "https": 443}


def client_config(region: str) -> Config:
    # ObjectStore's signing settings (SigV4, path-style); tests/unit/test_api_presign.py
    # keeps the two in step.
    return Config(region_name=region, signature_version="s3v4", s3={"addressing_style": "path"})


def signing_key(secret_key: str, day: str, region: str, service: str = SERVICE) -> bytes:
    """SigV4's derived key for one day (`YYYYMMDD`), region and service."""
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    return key


def _quote(value: str) -> str:
    return quote(value, safe="-_.~")


class _Base(NamedTuple):
    url: str  # everything before the bucket: scheme, host, any path prefix
    path: str  # the path part of `url` (the start of the canonical URI)
    host: str  # the signed host header: lowercase, port only when not the default


def _base(url: str) -> _Base:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if parts.port is not None and parts.port != DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return _Base(url, parts.path, host)


class Presigner:
    """Signs GET URLs for `(bucket, key)` items, valid for `expires_in` seconds."""

    def __init__(self, endpoint_url: str | None, region: str, expires_in: int) -> None:
        self.endpoint_url = endpoint_url
        self.region = region
        self.expires_in = expires_in
        self._session = boto3.session.Session()
        self._client: Any = self._session.client(
            "s3", endpoint_url=endpoint_url, config=client_config(region)
        )
        self._bases: dict[str, _Base] = {}
        self._key: tuple[str, str, bytes] | None = None  # (secret, day, signing key)
        self._lock = threading.Lock()

    def one(self, bucket: str, key: str) -> str:
        return self.many([(bucket, key)])[0]

    def many(self, items: list[tuple[str, str]], now: datetime | None = None) -> list[str]:
        """One URL per item, in order, all signed at `now` (default: the current time)."""
        credentials = self._session.get_credentials()
        if credentials is None:
            raise NoCredentialsError()
        frozen = credentials.get_frozen_credentials()  # refreshes expiring ones
        if frozen.access_key is None or frozen.secret_key is None:
            raise NoCredentialsError()
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        signing = self._signing_key(frozen.secret_key, day)
        scope = f"{day}/{self.region}/{SERVICE}/aws4_request"
        # the auth parameters in boto3's order (the URL), sorted (the canonical request)
        params = [
            ("X-Amz-Algorithm", ALGORITHM),
            ("X-Amz-Credential", _quote(f"{frozen.access_key}/{scope}")),
            ("X-Amz-Date", stamp),
            ("X-Amz-Expires", str(self.expires_in)),
            ("X-Amz-SignedHeaders", "host"),
        ]
        if frozen.token is not None:
            params.append(("X-Amz-Security-Token", _quote(frozen.token)))
        query = "&".join(f"{k}={v}" for k, v in params)
        canonical_query = "&".join(f"{k}={v}" for k, v in sorted(params))
        string_to_sign = f"{ALGORITHM}\n{stamp}\n{scope}\n"
        urls = []
        for bucket, key in items:
            base = self._base(bucket)
            path = quote(f"{bucket}/{key}".encode(), safe="/~")
            canonical = (
                f"GET\n{base.path}{path}\n{canonical_query}\n"
                f"host:{base.host}\n\nhost\nUNSIGNED-PAYLOAD"
            )
            digest = hashlib.sha256(canonical.encode()).hexdigest()
            signature = hmac.digest(signing, (string_to_sign + digest).encode(), "sha256").hex()
            urls.append(f"{base.url}{path}?{query}&X-Amz-Signature={signature}")
        return urls

    def _signing_key(self, secret_key: str, day: str) -> bytes:
        with self._lock:
            if self._key is None or self._key[:2] != (secret_key, day):
                self._key = (secret_key, day, signing_key(secret_key, day, self.region))
            return self._key[2]

    def _base(self, bucket: str) -> _Base:
        """Where boto3 sends this bucket's requests, from one probe URL per bucket."""
        base = self._bases.get(bucket)
        if base is None:
            probe = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": PROBE_KEY}, ExpiresIn=1
            )
            url = probe.split("?", 1)[0]
            suffix = f"{quote(bucket, safe='/~')}/{PROBE_KEY}"
            if not url.endswith(suffix):
                raise RuntimeError(f"not a path-style URL for bucket {bucket}: {url}")
            base = self._bases[bucket] = _base(url[: -len(suffix)])
        return base
