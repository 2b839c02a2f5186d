"""`dlm setup` says whether the bucket exists and is writable; the code location refuses
to load with the same one-line-per-problem message as the `dlm` commands."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.integration.webserver import LOCATION_QUERY, ROOT, graphql, webserver

DLM = str(Path(sys.executable).parent / "dlm")


def setup(tmp_path: Path, seaweedfs, bucket: str, *args: str, **env: str):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "DAGSTER_"))}
    return subprocess.run(
        [DLM, "setup", "--project-dir", str(ROOT), *args],
        env=clean
        | {
            "DAGSTER_HOME": str(tmp_path / "dagster-home"),
            "DLM_DATABASE_URL": f"sqlite:///{tmp_path / 'catalog.sqlite'}",
            "DLM_S3_ENDPOINT_URL": seaweedfs.endpoint_url,
            "DLM_S3_BUCKET": bucket,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            **env,
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_setup_refuses_a_missing_bucket_and_creates_it_when_asked(tmp_path: Path, seaweedfs):
    bucket = f"dlm-setup-{uuid.uuid4().hex[:8]}"
    missing = setup(tmp_path, seaweedfs, bucket)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.splitlines() == [
        f"dlm setup: DLM_S3_BUCKET={bucket!r}: no such bucket at {seaweedfs.endpoint_url} "
        "(create it, or run `dlm setup --create-bucket`)"
    ]
    created = setup(tmp_path, seaweedfs, bucket, "--create-bucket")
    assert created.returncode == 0, created.stderr
    assert f"bucket {bucket} exists and is writable" in created.stdout
    again = setup(tmp_path, seaweedfs, bucket)  # idempotent, and nothing left behind
    assert again.returncode == 0, again.stderr


def test_setup_says_when_the_keys_cannot_write(tmp_path: Path, seaweedfs):
    bucket = f"dlm-setup-{uuid.uuid4().hex[:8]}"
    assert setup(tmp_path, seaweedfs, bucket, "--create-bucket").returncode == 0
    denied = setup(tmp_path, seaweedfs, bucket, AWS_SECRET_ACCESS_KEY="not-the-secret")
    assert denied.returncode == 2
    (line,) = denied.stderr.splitlines()
    assert line.startswith(f"dlm setup: DLM_S3_BUCKET={bucket!r}: not writable at ")
    assert f"AWS_ACCESS_KEY_ID={TEST_ACCESS_KEY!r}" in line and "not-the-secret" not in line


@pytest.mark.timeout(300)
def test_the_code_location_refuses_to_load_with_the_same_message(tmp_path: Path) -> None:
    env = {"DLM_S3_ENDPOINT_URL": "s3.lab.example:8333", "DLM_API_PORT": "abc"}
    with webserver(tmp_path / "home", tmp_path, env) as url:
        (entry,) = graphql(url, LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
    error = entry["locationOrLoadError"]
    assert error["__typename"] == "PythonError"
    # the UI shows the load error and, under it, its cause: our message
    shown = "\n".join([error["message"], *(c["message"] for c in error["causes"])])
    assert (
        "DLM_S3_ENDPOINT_URL='s3.lab.example:8333': needs a scheme, http:// or https:// "
        "(e.g. DLM_S3_ENDPOINT_URL=http://127.0.0.1:8333)" in shown
    )
    assert "DLM_API_PORT='abc': Input should be a valid integer" in shown
