"""A real `dagster-webserver` on the project's workspace, for tests that ask its GraphQL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from dlm_pipelines.deployment import prepare_dagster_home

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = {"repositoryLocationName": "dlm", "repositoryName": "__repository__"}
LOCATION_QUERY = (
    "{workspaceOrError{... on Workspace{locationEntries{loadStatus "
    "locationOrLoadError{__typename ... on PythonError{message causes{message}}}}}}}"
)


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


@contextmanager
def webserver(home: Path, cwd: Path, env: Mapping[str, str]) -> Iterator[str]:
    """The webserver's URL once the code location finished loading (or failed to)."""
    prepare_dagster_home(home, ROOT, None)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "DAGSTER_"))} | {
        "DAGSTER_HOME": str(home),
        **env,
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = cwd / "webserver.log"
    with open(log_path, "wb") as log:
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
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                entries = graphql(url, LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
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
