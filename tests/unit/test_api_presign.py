"""Presigned URLs from the API's signer: the same signing as ObjectStore, bounded life."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from dlm_api import presign
from dlm_api.presign import Presigner
from dlm_pipelines.resources import ObjectStore

ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _credentials(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit-test-secret")


def test_the_signer_configures_boto3_like_the_object_store() -> None:
    ours = presign._client(ENDPOINT, "us-east-1").meta.config
    store = ObjectStore(bucket="b", endpoint_url=ENDPOINT).client.meta.config
    assert ours.signature_version == store.signature_version
    assert ours.s3["addressing_style"] == store.s3["addressing_style"] == "path"
    assert ours.region_name == store.region_name


def test_urls_expire_after_the_configured_time_and_name_the_key() -> None:
    signer = Presigner(ENDPOINT, "us-east-1", expires_in=900, processes=1)
    items = [("bucket", f"images/exp-a/20261201/12000{i}.tar") for i in range(presign.CHUNK + 5)]
    urls = signer.many(items)  # one process: signed inline, in order
    assert len(urls) == len(items)
    for (bucket, key), url in zip(items, urls, strict=True):
        parts = urlsplit(url)
        assert parts.path == f"/{bucket}/{key}"
        assert parse_qs(parts.query)["X-Amz-Expires"] == ["900"]
    assert signer.one("bucket", "k.tar").startswith(f"{ENDPOINT}/bucket/k.tar?")
