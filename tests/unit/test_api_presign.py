"""Presigned URLs from the API's signer: byte for byte boto3's, with ObjectStore's settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore import auth

from dlm_api import presign
from dlm_api.presign import Presigner
from dlm_pipelines.resources import ObjectStore

ENDPOINT = "http://127.0.0.1:9"
KEYS = [
    "images/exp-a/20261201/120000.tar",
    "videos/20261201_Plate042/20261201/235959-7f3c0e1a-2b4d-4c8e-9f10-aa55bb66cc77.tar",
    "overview/exp with spaces+plus=eq&amp/20261201/000000.tar",
    "images/Ünïcødé ~tilde/!*'()[]@$,;/20261201/010203.tar",
]


@pytest.fixture(autouse=True)
def _credentials(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit-test-secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def boto3_url(store: ObjectStore, key: str, expires_in: int, at: datetime, monkeypatch) -> str:
    """ObjectStore's boto3 client presigning `key` with its clock fixed at `at`."""
    monkeypatch.setattr(auth, "get_current_datetime", lambda *a, **k: at.replace(tzinfo=None))
    return str(
        store.client.generate_presigned_url(
            "get_object", Params={"Bucket": store.bucket, "Key": key}, ExpiresIn=expires_in
        )
    )


def test_the_signer_configures_boto3_like_the_object_store() -> None:
    ours = presign.client_config("us-east-1")
    store = ObjectStore(bucket="b", endpoint_url=ENDPOINT).client.meta.config
    assert ours.signature_version == store.signature_version
    assert ours.s3["addressing_style"] == store.s3["addressing_style"] == "path"
    assert ours.region_name == store.region_name


@pytest.mark.parametrize(
    ("endpoint", "region"),
    [
        (ENDPOINT, "us-east-1"),
        ("https://S3.Example.org:443/prefix", "eu-west-1"),  # default port, a path prefix
        (None, "eu-central-1"),  # AWS itself: boto3 resolves the endpoint
    ],
)
def test_urls_equal_boto3s_for_a_fixed_clock(endpoint, region, monkeypatch) -> None:
    at = datetime(2026, 12, 1, 23, 59, 58, tzinfo=UTC)
    store = ObjectStore(bucket="mycostreams-raw-data", endpoint_url=endpoint, region_name=region)
    signer = Presigner(endpoint, region, expires_in=900)
    ours = signer.many([(store.bucket, key) for key in KEYS], now=at)
    theirs = [boto3_url(store, key, 900, at, monkeypatch) for key in KEYS]
    for mine, boto in zip(ours, theirs, strict=True):
        assert parse_qs(urlsplit(mine).query) == parse_qs(urlsplit(boto).query)
        assert mine == boto
    # the next day derives a new signing key: still boto3's signature
    later = at + timedelta(seconds=3)
    assert signer.many([(store.bucket, KEYS[0])], now=later) == [
        boto3_url(store, KEYS[0], 900, later, monkeypatch)
    ]


def test_temporary_credentials_sign_their_session_token(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzE+token/with=odd+chars")
    at = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    endpoint = "http://127.0.0.1:10"  # ObjectStore caches its client: a new one, with the token
    store = ObjectStore(bucket="b", endpoint_url=endpoint)
    [url] = Presigner(endpoint, "us-east-1", expires_in=60).many([("b", KEYS[2])], now=at)
    assert parse_qs(urlsplit(url).query)["X-Amz-Security-Token"] == [
        "FwoGZXIvYXdzE+token/with=odd+chars"
    ]
    assert url == boto3_url(store, KEYS[2], 60, at, monkeypatch)


def test_urls_expire_after_the_configured_time_and_name_the_key() -> None:
    signer = Presigner(ENDPOINT, "us-east-1", expires_in=900)
    items = [("bucket", f"images/exp-a/20261201/12{i:04d}.tar") for i in range(500)]
    urls = signer.many(items)
    assert len(urls) == len(items)
    for (bucket, key), url in zip(items, urls, strict=True):
        parts = urlsplit(url)
        assert parts.path == f"/{bucket}/{key}"
        assert parse_qs(parts.query)["X-Amz-Expires"] == ["900"]
    assert signer.one("bucket", "k.tar").startswith(f"{ENDPOINT}/bucket/k.tar?")
