"""The production topology of compose.yml, run as plain processes on loopback with the
same commands: `dlm setup --create-bucket`, `dagster code-server start` (where runs
execute), webserver and daemon on a gRPC workspace with PostgreSQL storage, `dlm api`.

As in compose.yml, only the code server sees the data root: the daemon and the
webserver are given one that does not exist, so an export that succeeds was run in
the code server's process tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from dlm_pipelines.catalog import Catalog, EventStatus
from dlm_pipelines.dev.processes import ManagedProcess
from dlm_pipelines.dev.seaweedfs import free_port_block
from tests.conftest import POSTGRES_ADMIN_URL, REDIS_URL, TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.integration.helpers import make_event
from tests.integration.webserver import LOCATION_QUERY, graphql
from tests.postgres import temporary_database

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKEN = f"ops-{uuid.uuid4().hex}"


class Topology:
    def __init__(self, tmp: Path, env: dict[str, str], ports: int) -> None:
        self.tmp, self.env = tmp, env
        self.grpc_port, self.ui_port, self.api_port = ports, ports + 1, ports + 2
        self.processes: list[ManagedProcess] = []

    def start(self, name: str, args: list[str], **env: str) -> ManagedProcess:
        process = ManagedProcess(
            name, args, self.env | env, self.tmp / "logs" / f"{name}.log", cwd=self.tmp
        )
        process.start()
        self.processes.append(process)
        return process

    def check_alive(self) -> None:
        for process in self.processes:
            assert process.running(), f"{process.name} exited:\n{process.tail(40)}"

    def wait_for(self, what: str, check, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = check()
            except (httpx.HTTPError, OSError):
                result = None
            if result:
                return result
            self.check_alive()
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s: {what}"
            time.sleep(1)

    def stop(self) -> None:
        for process in reversed(self.processes):  # api, daemon, webserver, code server
            process.stop()


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, seaweedfs) -> Iterator[Topology]:
    tmp = tmp_path_factory.mktemp("production")
    prefix = f"dlm-prod:{uuid.uuid4().hex[:8]}"
    with (
        temporary_database(POSTGRES_ADMIN_URL, "dlm_prod_catalog") as catalog_url,
        temporary_database(POSTGRES_ADMIN_URL, "dlm_prod_dagster") as dagster_url,
    ):
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "DAGSTER_"))}
        env = (
            base
            | {
                "DAGSTER_HOME": str(tmp / "dagster-home"),
                "DLM_DATABASE_URL": catalog_url,
                "DLM_DAGSTER_POSTGRES_URL": dagster_url,  # postgresql+psycopg2://, as in compose
                "DLM_REDIS_URL": REDIS_URL,
                "DLM_S3_ENDPOINT_URL": seaweedfs.endpoint_url,
                "DLM_S3_BUCKET": f"dlm-prod-{uuid.uuid4().hex[:8]}",
                "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
                "DLM_IMAGING_EVENT_STREAM": f"{prefix}:new-imaging-event",
                "DLM_EXPORT_STREAM": f"{prefix}:new-export",
                "DLM_DEAD_LETTER_STREAM": f"{prefix}:dead-letter",
                "DLM_SENSOR_INTERVAL_SECONDS": "1",
                "DLM_API_TOKENS": f"ops:{TOKEN}",
                # the daemon and webserver never read the data root (compose mounts it only
                # in the code server): a wrong one here proves where runs execute
                "DLM_DATA_ROOT": str(tmp / "not-mounted-here"),
            }
        )
        data_root = tmp / "data"
        data_root.mkdir()
        top = Topology(tmp, env, free_port_block(3))
        (tmp / "workspace.yaml").write_text(
            yaml.safe_dump(
                {
                    "load_from": [
                        {
                            "grpc_server": {
                                "host": "127.0.0.1",
                                "port": top.grpc_port,
                                "location_name": "dlm",
                            }
                        }
                    ]
                }
            )
        )
        try:
            setup = subprocess.run(
                [str(BIN / "dlm"), "setup", "--create-bucket", "--project-dir", str(ROOT)],
                env=env, cwd=tmp, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert setup.returncode == 0, setup.stdout + setup.stderr
            assert "dagster.postgres.yaml" in setup.stdout
            assert "exists and is writable" in setup.stdout
            top.start(
                "code-server",
                [str(BIN / "dagster"), "code-server", "start", "-h", "127.0.0.1",
                 "-p", str(top.grpc_port), "-m", "dlm_pipelines.definitions",
                 "--location-name", "dlm"],
                DLM_DATA_ROOT=str(data_root),
            )  # fmt: skip
            # as compose's depends_on: service_healthy, with the same health check
            top.wait_for(
                "the code server is healthy",
                lambda: subprocess.run(
                    [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(top.grpc_port)],
                    env=env, capture_output=True, timeout=60,
                ).returncode == 0,
                300,
            )  # fmt: skip
            workspace = str(tmp / "workspace.yaml")
            top.start(
                "webserver",
                [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(top.ui_port),
                 "-w", workspace],
            )  # fmt: skip
            top.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", workspace])
            top.start("api", [str(BIN / "dlm"), "api"], DLM_API_PORT=str(top.api_port))
            top.data_root = data_root  # type: ignore[attr-defined]
            yield top
        finally:
            top.stop()
            redis.Redis.from_url(REDIS_URL).delete(
                env["DLM_IMAGING_EVENT_STREAM"], env["DLM_EXPORT_STREAM"],
                env["DLM_DEAD_LETTER_STREAM"],
            )  # fmt: skip


def test_events_are_exported_by_runs_in_the_code_server_and_listed(topology: Topology) -> None:
    ui = f"http://127.0.0.1:{topology.ui_port}"

    def loaded() -> bool:
        entries = graphql(ui, LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
        (entry,) = entries
        assert entry["locationOrLoadError"]["__typename"] != "PythonError", entry
        return entry["loadStatus"] == "LOADED"

    topology.wait_for("the webserver loads the code server's location", loaded, 300)

    data_root: Path = topology.data_root  # type: ignore[attr-defined]
    events = [make_event(data_root), make_event(data_root, system="tsu-exp002")]
    streams = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    for fields in events:
        streams.xadd(topology.env["DLM_IMAGING_EVENT_STREAM"], fields)

    catalog = Catalog(database_url=topology.env["DLM_DATABASE_URL"])

    def verified() -> bool:
        records = catalog.get_many([e["ref_id"] for e in events])
        failed = [r.last_error for r in records if r.status == EventStatus.FAILED]
        assert not failed, failed  # e.g. a run that did not see the code server's data root
        return len(records) == 2 and all(r.status == EventStatus.VERIFIED for r in records)

    topology.wait_for("both events verified", verified, 300)

    with httpx.Client(
        base_url=f"http://127.0.0.1:{topology.api_port}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    ) as api:
        topology.wait_for("the API answers", lambda: api.get("/health").status_code == 204, 120)
        now = datetime.now(UTC)
        window = {"start": (now - timedelta(hours=1)).isoformat(), "end": now.isoformat()}
        page = api.get("/api/1/exports", params={**window, "limit": 99})
        assert page.status_code == 200, page.text
        assert {e["ref_id"] for e in events} <= {r["ref_id"] for r in page.json()["data"]}
        metrics = api.get("/metrics")
        assert metrics.status_code == 200
        assert 'dlm_events{status="verified",system="prince"} 1.0' in metrics.text

    status = subprocess.run(
        [str(BIN / "dlm"), "status", "--json"],
        env=topology.env | {"DLM_DATA_ROOT": str(data_root), "DLM_PURGE_MIN_FREE": "0"},
        cwd=topology.tmp, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert '"backlog": 0' in status.stdout, status.stdout + status.stderr
