"""`dlm dev`: the whole DLM on this machine, on loopback, state under `.dlm/`.

Starts SeaweedFS (bucket created), Redis (the one at DLM_REDIS_URL, or an embedded
one when none answers), the catalog schema, the Dagster webserver and daemon on a
persistent instance, the API and mock-prince; prints where everything is; stops
everything it started when interrupted. A second start reuses `.dlm/`: object
data, Redis data, the Dagster instance, the catalog and the credentials.

`DevStack` is also the way tests and benchmarks run the stack as real processes:
each piece has its own `start_*` method and each child is a `ManagedProcess`
(`stack.processes["daemon"].kill()` then `.start()` simulates a crash).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from dlm_pipelines.deployment import set_up
from dlm_pipelines.dev.environment import settings_env
from dlm_pipelines.dev.probes import (
    LOOPBACK,
    free_port,
    http_status,
    rabbitmq_problem,
)
from dlm_pipelines.dev.processes import MARKER, ManagedProcess, kill_marked
from dlm_pipelines.dev.redis_server import EmbeddedRedis, embedded_port, redis_answers
from dlm_pipelines.settings import hide_password

if TYPE_CHECKING:
    from dlm_pipelines.dev.seaweedfs import SeaweedFS
    from dlm_pipelines.settings import Settings

# Children that must stay up; mock-prince may end by itself (--count).
ESSENTIAL = ("redis", "webserver", "daemon", "api")
STOP_ORDER = ("mock-prince", "api", "daemon", "webserver", "redis")
PROBE_KEY = "dlm-dev-stack/probe"  # written and deleted at start, outside <kind>/...
DEFAULT_MOCK_PRINCE_ARGS = ("--interval", "10", "--size", "256KiB")


# --- the stack ---------------------------------------------------------------------------


class DevStack:
    def __init__(
        self,
        project_dir: Path,
        state_dir: Path,
        *,
        settings: Settings | None = None,
        ui_port: int = 3000,
        api_port: int = 8000,
        out: IO[str] = sys.stdout,
    ) -> None:
        from dlm_pipelines.settings import Settings

        self.project_dir = project_dir.absolute()
        self.state_dir = state_dir.absolute()
        self.settings = settings or Settings()
        self.ui_port = ui_port
        self.api_port = api_port
        self.out = out
        self.logs = self.state_dir / "logs"
        self.dagster_home = self.state_dir / "dagster"
        explicit = self.settings.model_fields_set
        self.data_root = (
            self.settings.data_root.absolute()
            if "data_root" in explicit
            else self.state_dir / "data"
        )
        self.database_url = (
            self.settings.database_url
            if "database_url" in explicit
            else f"sqlite:///{self.state_dir / 'catalog.sqlite'}"
        )
        self.credentials = self._credentials()
        self.marker = str(self.state_dir)
        self.processes: dict[str, ManagedProcess] = {}
        self.seaweedfs: SeaweedFS | None = None
        self.redis_url = self.settings.redis_url
        self.redis_embedded = False
        self.rabbitmq_idle_reason: str | None = None
        self._lock: IO[str] | None = None

    # --- state kept under .dlm ---

    def _credentials(self) -> dict[str, str]:
        """S3 keys and the API token: generated on the first start, then reused."""
        path = self.state_dir / "credentials.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        credentials = {
            "s3_access_key": "dlm" + secrets.token_hex(8),
            "s3_secret_key": secrets.token_urlsafe(30),
            "api_token": secrets.token_urlsafe(24),
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(credentials, handle, indent=2)
        return credentials

    def lock(self) -> None:
        """One stack per state directory; leftovers of a crashed one are killed by PID."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.state_dir / "dev.pid", "a+")  # noqa: SIM115 (held while running)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise RuntimeError(
                f"another dev stack (PID {owner}) is using {self.state_dir}; stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle
        leftovers = kill_marked(self.marker)
        if leftovers:
            self.say(f"killed {len(leftovers)} process(es) left by an earlier stack: {leftovers}")

    # --- the environment every child gets ---

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        values: dict[str, str | None] = settings_env(self.settings)
        values.update(
            {
                MARKER: self.marker,
                "DAGSTER_HOME": str(self.dagster_home),
                "DLM_DATA_ROOT": str(self.data_root),
                "DLM_DATABASE_URL": self.database_url,
                "DLM_REDIS_URL": self.redis_url,
                "AWS_ACCESS_KEY_ID": self.credentials["s3_access_key"],
                "AWS_SECRET_ACCESS_KEY": self.credentials["s3_secret_key"],
                "DLM_API_HOST": LOOPBACK,
                "DLM_API_PORT": str(self.api_port),
                "DLM_API_TOKENS": f"dev:{self.credentials['api_token']}",
                "DLM_DAGSTER_UI_URL": self.ui_url,
            }
        )
        if self.seaweedfs is not None:
            values["DLM_S3_ENDPOINT_URL"] = self.seaweedfs.endpoint_url
        if self.rabbitmq_idle_reason is not None:
            values["DLM_RABBITMQ_URL"] = None  # the archive sensor then says it is idle
        for key, value in values.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    @property
    def ui_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ui_port}"

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}"

    def say(self, message: str) -> None:
        print(f"dlm dev: {message}", file=self.out, flush=True)

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def _process(self, name: str, args: Sequence[str]) -> ManagedProcess:
        process = ManagedProcess(
            name, args, self.env, self.logs / f"{name}.log", cwd=self.project_dir
        )
        self.processes[name] = process
        return process

    # --- the pieces, in start order ---

    def start_object_store(self) -> None:
        from dlm_pipelines.dev.seaweedfs import SeaweedFS, free_port_block, port_block_free
        from dlm_pipelines.resources import ObjectStore

        data_dir = self.state_dir / "seaweedfs"
        port_file = data_dir / "base-port"
        saved = int(port_file.read_text()) if port_file.exists() else None
        base_port = saved if saved and port_block_free(saved) else free_port_block(11)
        self.seaweedfs = SeaweedFS(
            data_dir,
            self.credentials["s3_access_key"],
            self.credentials["s3_secret_key"],
            base_port=base_port,
            env=self.env,
        )
        self.seaweedfs.start()
        port_file.write_text(str(base_port))
        store = ObjectStore(
            bucket=self.settings.s3_bucket, endpoint_url=self.seaweedfs.endpoint_url
        )
        with _aws_keys(self.credentials):
            store.ensure_bucket()
        self._wait_until_writable(store.bucket)
        self.say(f"SeaweedFS S3 on {self.seaweedfs.endpoint_url}, bucket {store.bucket}")

    def _wait_until_writable(self, bucket: str, timeout: float = 60) -> None:
        """S3 answers before the volume server has registered its volumes; until then
        reads of existing objects and all writes fail. A write, read and delete prove it."""
        client = self.s3_client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.put_object(Bucket=bucket, Key=PROBE_KEY, Body=b"probe")
                client.get_object(Bucket=bucket, Key=PROBE_KEY)["Body"].read()
                client.delete_object(Bucket=bucket, Key=PROBE_KEY)
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS is not writable after {timeout}s: {exc}"
                    ) from exc
                time.sleep(0.5)

    def s3_client(self) -> Any:
        """A boto3 client for this stack's SeaweedFS, with its keys (tests, benchmarks)."""
        import boto3

        if self.seaweedfs is None:
            raise RuntimeError("the object store is not started")
        return boto3.client(
            "s3",
            endpoint_url=self.seaweedfs.endpoint_url,
            aws_access_key_id=self.credentials["s3_access_key"],
            aws_secret_access_key=self.credentials["s3_secret_key"],
            region_name=self.settings.aws_region,
        )

    def start_redis(self) -> None:
        if redis_answers(self.redis_url):
            self.say(f"using the Redis at {hide_password(self.redis_url)}")
            return
        port = free_port(embedded_port(self.redis_url, 6390))
        redis = EmbeddedRedis(self.state_dir / "redis", port, self.env, self.logs / "redis.log")
        self.say(f"no Redis answers at {hide_password(self.redis_url)}: starting an embedded one")
        self.processes["redis"] = redis
        redis.start()
        self.redis_url = redis.url
        self.redis_embedded = True

    def check_rabbitmq(self) -> None:
        self.rabbitmq_idle_reason = rabbitmq_problem(self.settings.rabbitmq_url)
        if self.rabbitmq_idle_reason:
            self.say(
                f"RabbitMQ not used ({self.rabbitmq_idle_reason}): the archive sensor will "
                "stay idle and no tape-archive locations will arrive"
            )

    def set_up(self) -> None:
        """What `dlm setup` does in production: the catalog schema, then the Dagster
        instance file and storage schema, before any Dagster process starts."""
        set_up(
            database_url=self.database_url,
            dagster_postgres_url=self.settings.dagster_postgres_url,
            dagster_home=self.dagster_home,
            project_dir=self.project_dir,
            env=self.env,
            say=lambda _line: None,
        )

    def start_dagster(self, webserver: bool = True, daemon: bool = True) -> None:
        workspace = str(self.project_dir / "workspace.yaml")
        if webserver:
            self._process(
                "webserver",
                [
                    self._bin("dagster-webserver"),
                    "-h",
                    LOOPBACK,
                    "-p",
                    str(self.ui_port),
                    "-w",
                    workspace,
                ],
            ).start()
        if daemon:
            self._process("daemon", [self._bin("dagster-daemon"), "run", "-w", workspace]).start()

    def start_api(self) -> None:
        self._process("api", [self._bin("dlm"), "api"]).start()

    def start_mock_prince(self, args: Sequence[str] = DEFAULT_MOCK_PRINCE_ARGS) -> None:
        self._process("mock-prince", [self._bin("dlm"), "mock-prince", *args]).start()

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the UI has loaded the code location and the API answers /health."""
        deadline = time.monotonic() + timeout
        pending = {name for name in ("webserver", "api") if name in self.processes}
        while pending:
            for name in sorted(pending):
                self._check_alive(name)
                if self._ui_loaded() if name == "webserver" else self._api_up():
                    pending.discard(name)
            if "daemon" in self.processes:
                self._check_alive("daemon")
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(sorted(pending))}")
            time.sleep(0.5)

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if not process.running():
            raise RuntimeError(
                f"{name} exited with {process.exit_code()}; last lines of {process.log_path}:\n"
                + process.tail()
            )

    def _api_up(self) -> bool:
        return http_status(f"{self.api_url}/health") == 204

    def _ui_loaded(self) -> bool:
        query = (
            "{workspaceOrError{... on Workspace{locationEntries{name loadStatus "
            "locationOrLoadError{__typename ... on PythonError{message}}}}}}"
        )
        request = urllib.request.Request(
            f"{self.ui_url}/graphql",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                entries = json.load(response)["data"]["workspaceOrError"]["locationEntries"]
        except (urllib.error.URLError, OSError, KeyError, TypeError, ValueError):
            return False
        for entry in entries:
            loaded = entry.get("locationOrLoadError") or {}
            if loaded.get("__typename") == "PythonError":
                raise RuntimeError(
                    f"code location {entry['name']} failed to load:\n{loaded.get('message')}"
                )
        return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)

    # --- the whole stack ---

    def start(self, mock_prince_args: Sequence[str] | None = DEFAULT_MOCK_PRINCE_ARGS) -> None:
        self.lock()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.start_object_store()
        self.start_redis()
        self.check_rabbitmq()
        self.set_up()
        self.start_dagster()
        self.start_api()
        self.say("waiting for the Dagster UI to load the code location …")
        self.wait_ready()
        if mock_prince_args is not None:
            self.start_mock_prince(mock_prince_args)
        self.write_env_file()

    def stop(self) -> None:
        """Stop every child by PID, in order; SeaweedFS last, with SIGKILL."""
        for name in [*STOP_ORDER, *(n for n in self.processes if n not in STOP_ORDER)]:
            if name in self.processes:
                self.processes[name].stop()
        if self.seaweedfs is not None:
            self.seaweedfs.stop()
        leftovers = kill_marked(self.marker)
        if leftovers:
            self.say(f"killed {len(leftovers)} leftover process(es): {leftovers}")
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def failed_process(self) -> ManagedProcess | None:
        for name in ESSENTIAL:
            process = self.processes.get(name)
            if process is not None and not process.running():
                return process
        return None

    def write_env_file(self) -> Path:
        """`.dlm/dev.env`: `source` it to point `dlm` commands at this stack."""
        path = self.state_dir / "dev.env"
        keys = sorted(k for k in self.env if k.startswith(("DLM_", "AWS_")) or k == "DAGSTER_HOME")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.writelines(
                f"export {k}={json.dumps(self.env[k])}\n" for k in keys if k != MARKER
            )
        return path

    def summary(self) -> str:
        token = self.credentials["api_token"]
        api = (
            f"{self.api_url}/docs   token: {token}\n"
            f"                 curl -H 'Authorization: Bearer {token}' {self.api_url}/api/1/exports"
            if "api" in self.processes
            else "not started (no `dlm api` command in this version)"
        )
        s3 = self.seaweedfs.endpoint_url if self.seaweedfs else "?"
        redis = hide_password(self.redis_url) + (
            f"  (embedded, data in {self.state_dir / 'redis'})" if self.redis_embedded else ""
        )
        rabbit = (
            f"idle: {self.rabbitmq_idle_reason}"
            if self.rabbitmq_idle_reason
            else hide_password(str(self.settings.rabbitmq_url))
        )
        producer = self.processes.get("mock-prince")
        lines = [
            f"DLM is running (state in {self.state_dir}). Ctrl-C stops everything.",
            f"  Dagster UI     {self.ui_url}",
            f"  API docs       {api}",
            f"  S3             {s3}  bucket {self.settings.s3_bucket}",
            f"                 AWS_ACCESS_KEY_ID={self.credentials['s3_access_key']}",
            f"                 AWS_SECRET_ACCESS_KEY={self.credentials['s3_secret_key']}",
            f"  Redis          {redis}",
            f"                 events on {self.settings.imaging_event_stream}, "
            f"exports on {self.settings.export_stream}",
            f"  RabbitMQ       {rabbit}",
            f"  Catalog        {self.database_url}",
            f"  Data root      {self.data_root}",
            f"  mock-prince    {f'writing events, log {producer.log_path}' if producer else 'off'}",
            f"  Logs           {self.logs}/",
            f"  Environment    source {self.state_dir / 'dev.env'}  (then any `dlm` command)",
        ]
        return "\n".join(lines)


@contextmanager
def _aws_keys(credentials: Mapping[str, str]) -> Iterator[None]:
    """The stack's S3 keys for boto3 calls made in this process."""
    keys = {
        "AWS_ACCESS_KEY_ID": credentials["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": credentials["s3_secret_key"],
    }
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- the command -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=Path(".dlm"), help="default .dlm")
    parser.add_argument("--ui-port", type=int, default=3000, help="Dagster UI (default 3000)")
    parser.add_argument("--api-port", type=int, help="API (default DLM_API_PORT, else 8000)")
    parser.add_argument("--no-mock-prince", action="store_true", help="start no producer")
    parser.add_argument(
        "--events-interval", type=float, default=10, help="seconds between mock events"
    )
    parser.add_argument("--event-size", default="256KiB", help="pixel bytes per mock event")
    parser.add_argument(
        "--malformed", type=float, default=0.0, help="fraction of malformed mock events"
    )


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    from dlm_pipelines.settings import Settings

    if not (Path.cwd() / "workspace.yaml").is_file():
        raise SystemExit("dlm dev: run it from the project root (where workspace.yaml is)")
    settings = Settings()
    stack = DevStack(
        Path.cwd(),
        args.state_dir,
        settings=settings,
        ui_port=args.ui_port,
        api_port=args.api_port or settings.api_port,
    )
    mock_args = (
        None
        if args.no_mock_prince
        else [
            "--interval",
            str(args.events_interval),
            "--size",
            args.event_size,
            "--malformed",
            str(args.malformed),
        ]
    )
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    code = 0
    try:
        stack.start(mock_args)
        print(stack.summary(), flush=True)
        while (failed := stack.failed_process()) is None:
            time.sleep(1)
        stack.say(
            f"{failed.name} exited with {failed.exit_code()}; last lines of "
            f"{failed.log_path}:\n{failed.tail()}"
        )
        code = 1
    except _Interrupted as interrupted:
        stack.say(f"{interrupted}: stopping")
    except RuntimeError as exc:
        stack.say(f"cannot run: {exc}")
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the shutdown finish
        stack.stop()
        stack.say("everything it started is stopped")
    return code
