"""No password reaches the Dagster UI: a real webserver loads the code location with
passwords in every store URL (from the environment and from `.env`), and its GraphQL
shows neither them in any resource's configured values nor in any job's default config.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dlm_pipelines.dev.deployment import prepare_dagster_home

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "pw-never-shown-8f3a"
REPOSITORY = {"repositoryLocationName": "dlm", "repositoryName": "__repository__"}


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.load(response)
    assert "errors" not in body, body
    return body["data"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def webserver(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("dagster-home")
    cwd = tmp_path_factory.mktemp("cwd")
    prepare_dagster_home(home, ROOT, None)
    # a password only in `.env`, as an operator of compose.yml would write it
    (cwd / ".env").write_text(f"DLM_RABBITMQ_URL=amqp://dlm:{PASSWORD}@127.0.0.1:1/%2F\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "DAGSTER_"))} | {
        "DAGSTER_HOME": str(home),
        "DLM_DATABASE_URL": f"postgresql+psycopg2://dlm:{PASSWORD}@127.0.0.1:1/dlm",
        "DLM_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:1/0",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(cwd / "webserver.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster-webserver"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            str(ROOT / "workspace.yaml"),
        ],
        env=env,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        query = "{workspaceOrError{... on Workspace{locationEntries{loadStatus}}}}"
        while True:
            assert process.poll() is None, (cwd / "webserver.log").read_text()[-3000:]
            try:
                entries = graphql(url, query)["workspaceOrError"]["locationEntries"]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "the webserver did not load the code location"
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def test_resources_show_the_variable_not_the_password(webserver: str) -> None:
    data = graphql(
        webserver,
        """query($repo: RepositorySelector!) {
          allTopLevelResourceDetailsOrError(repositorySelector: $repo) {
            __typename
            ... on ResourceDetailsList { results { name configuredValues { key value type } } }
          }
        }""",
        {"repo": REPOSITORY},
    )
    text = json.dumps(data)
    assert PASSWORD not in text
    resources = {
        r["name"]: {v["key"]: v for v in r["configuredValues"]}
        for r in data["allTopLevelResourceDetailsOrError"]["results"]
    }
    assert {"catalog", "streams", "archive_queue", "object_store"} <= set(resources)
    assert resources["catalog"]["database_url"] == {
        "key": "database_url",
        "value": "DLM_DATABASE_URL",
        "type": "ENV_VAR",
    }
    assert resources["streams"]["url"]["value"] == "DLM_REDIS_URL"
    assert resources["archive_queue"]["url"]["value"] == "DLM_RABBITMQ_URL"


def test_no_job_offers_a_password_in_its_default_config(webserver: str) -> None:
    data = graphql(
        webserver,
        """query($repo: RepositorySelector!) {
          repositoryOrError(repositorySelector: $repo) {
            ... on Repository { jobs { name } }
          }
        }""",
        {"repo": REPOSITORY},
    )
    jobs = [j["name"] for j in data["repositoryOrError"]["jobs"]]
    assert {"__ASSET_JOB", "purge"} <= set(jobs)
    for job in jobs:
        schema = graphql(
            webserver,
            """query($selector: PipelineSelector!) {
              runConfigSchemaOrError(selector: $selector) {
                __typename ... on RunConfigSchema { rootDefaultYaml }
              }
            }""",
            {"selector": {**REPOSITORY, "pipelineName": job}},
        )
        assert schema["runConfigSchemaOrError"]["__typename"] == "RunConfigSchema", job
        assert PASSWORD not in json.dumps(schema), job
