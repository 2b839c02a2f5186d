"""compose.yml: the production-like stack stays complete, healthy and in step with settings.py.

Nothing here runs a container (no Docker engine in CI); the last tests run the
`docker-compose` client's own validation and rendering (Debian's docker-compose
1.29, which `.ci/run` installs); a missing client fails them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dlm_pipelines.deployment import POSTGRES_CONFIG, instance_config
from dlm_pipelines.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yml"
SECRETS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "RABBITMQ_PASSWORD",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "DLM_API_TOKENS",
    "DAGSTER_UI_PASSWORD_HASH",
)
DAGSTER_SERVICES = ("code-server", "webserver", "daemon")
LONG_RUNNING = ("postgres", "redis", "rabbitmq", "s3", *DAGSTER_SERVICES, "ui-proxy", "api")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_the_stack_has_every_service(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {*LONG_RUNNING, "setup", "mock-prince"}
    for name in LONG_RUNNING:
        assert "test" in services[name].get("healthcheck", {}), f"{name} has no health check"
    # the producer is for development only; everything else is always on
    assert services["mock-prince"]["profiles"] == ["dev"]
    assert [n for n, s in services.items() if "profiles" in s] == ["mock-prince"]


def test_dagster_runs_on_postgres_with_one_daemon_and_the_code_server(compose: dict) -> None:
    services = compose["services"]
    daemons = [n for n, s in services.items() if "dagster-daemon" in s.get("command", [])]
    assert daemons == ["daemon"]
    assert "replicas" not in services["daemon"].get("deploy", {})
    workspace = yaml.safe_load((ROOT / "deploy/workspace.docker.yaml").read_text())
    (location,) = workspace["load_from"]
    code_server = services["code-server"]["command"]
    assert location["grpc_server"]["host"] == "code-server"
    assert str(location["grpc_server"]["port"]) == code_server[code_server.index("-p") + 1]
    for name in ("webserver", "daemon"):
        assert "deploy/workspace.docker.yaml" in services[name]["command"]
    for name in (*DAGSTER_SERVICES, "api", "setup"):
        env = env_of(services[name])
        # the driver the image has (SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3)
        assert env["DLM_DAGSTER_POSTGRES_URL"].startswith("postgresql+psycopg2://")
        # the same rule as `make dev` picks the instance file: PostgreSQL storage
        assert instance_config(ROOT, env["DLM_DAGSTER_POSTGRES_URL"]).name == POSTGRES_CONFIG
        assert "dagster-home:/opt/dagster/home" in services[name]["volumes"]
    # setup (schemas, bucket) finishes before anything uses them
    for name in ("code-server", "api"):
        condition = services[name]["depends_on"]["setup"]["condition"]
        assert condition == "service_completed_successfully"
    assert services["setup"]["command"] == ["dlm", "setup", "--create-bucket"]


def test_the_data_root_is_one_volume_shared_by_runs_and_producer(compose: dict) -> None:
    services = compose["services"]
    for name in ("code-server", "mock-prince"):
        data_root = env_of(services[name])["DLM_DATA_ROOT"]
        assert f"data-root:{data_root}" in services[name]["volumes"]
    assert "data-root" in compose["volumes"]


def test_secrets_come_from_the_environment_and_are_required() -> None:
    text = COMPOSE.read_text()
    for secret in SECRETS:
        uses = re.findall(r"\$\{" + secret + r"(:?[?-])?[^}]*\}", text)
        assert uses, f"{secret} is not used"
        assert all(u == ":?" for u in uses), f"{secret} must be required (${{{secret}:?...}})"
    example = (ROOT / ".env.example").read_text()
    for secret in SECRETS:
        assert re.search(rf"^{secret}=$", example, re.MULTILINE), f".env.example lacks {secret}"
    assert not re.search(r"(PASSWORD|SECRET|TOKENS?):\s*['\"]?[A-Za-z0-9]", text), "literal secret"


def test_every_dlm_variable_is_a_setting() -> None:
    """A renamed setting must not leave compose, the image or .env.example behind."""
    names = set(Settings.model_fields)
    aliases = {
        choice
        for field in Settings.model_fields.values()
        if field.validation_alias is not None
        for choice in getattr(field.validation_alias, "choices", [field.validation_alias])
    }
    for path in (COMPOSE, ROOT / "Dockerfile", ROOT / ".env.example"):
        used = set(re.findall(r"\bDLM_[A-Z0-9_]+\b", path.read_text()))
        used.discard("DLM_IMAGE_TAG")  # compose's own: which image tag to build and run
        unknown = {v for v in used if v.removeprefix("DLM_").lower() not in names}
        assert not unknown, f"{path.name} uses variables Settings does not have: {unknown}"
        aws = set(re.findall(r"\bAWS_[A-Z_]+\b", path.read_text()))
        assert aws <= aliases, f"{path.name}: {aws - aliases}"


def test_the_image_is_built_from_the_lock_file() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "uv sync --frozen --no-dev" in dockerfile
    assert "COPY pyproject.toml uv.lock" in dockerfile


DOCKER_COMPOSE = shutil.which("docker-compose")  # .ci/run installs it with apt


def run_config(
    tmp_path: Path, env: dict[str, str], dotenv: dict[str, str] | None = None, *args: str
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with `dotenv` as the project's `.env` (never a developer's own:
    the project directory is `tmp_path`, so `env_file: .env` reads that one)."""
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in (dotenv or {}).items()))
    assert DOCKER_COMPOSE is not None, "docker-compose is not installed (.ci/run installs it)"
    return subprocess.run(
        [
            DOCKER_COMPOSE,
            "--project-directory",
            str(tmp_path),
            "--env-file",
            str(env_file),
            "-f",
            str(COMPOSE),
            "config",
            *args,
        ],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


DUMMY_SECRETS = {secret: f"dummy-{secret.lower()}" for secret in SECRETS}


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    result = run_config(tmp_path, DUMMY_SECRETS, None, "-q")
    assert result.returncode == 0, result.stderr


def test_docker_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    result = run_config(tmp_path, {}, None, "-q")
    assert result.returncode != 0
    assert "set " in result.stderr and "PASSWORD" in result.stderr


def test_every_setting_in_dotenv_reaches_the_dlm_services(tmp_path: Path) -> None:
    """An operator's `DLM_PURGE_SYSTEMS=prince` in `.env` must reach the code server (where
    purge runs execute), the daemon and the API; the fixed wiring still wins."""
    dotenv = {
        **DUMMY_SECRETS,
        "DLM_PURGE_SYSTEMS": "prince",
        "DLM_PURGE_LIFESPAN": "P2D",
        "DLM_DATA_ROOT": "/somewhere/else",  # the compose wiring must win over this
    }
    result = run_config(tmp_path, {}, dotenv)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("code-server", "daemon", "api", "webserver", "setup"):
        env = env_of(services[name])
        assert env.get("DLM_PURGE_SYSTEMS") == "prince", f"{name} does not see DLM_PURGE_SYSTEMS"
        assert env.get("DLM_PURGE_LIFESPAN") == "P2D", name
    assert env_of(services["code-server"])["DLM_DATA_ROOT"] == "/data"
    assert env_of(services["api"])["DLM_API_TOKENS"] == DUMMY_SECRETS["DLM_API_TOKENS"]


def test_the_ui_is_published_only_behind_a_login(tmp_path: Path) -> None:
    """Dagster OSS has no login and its UI launches forced re-exports and purges."""
    bcrypt = "$2a$14$Zkx19XLiW6VYouLHR5NmfOFU0z2GTNmpkT/5qqR7hx4IjWJPDhjvG"
    result = run_config(tmp_path, {}, {**DUMMY_SECRETS, "DAGSTER_UI_PASSWORD_HASH": f"'{bcrypt}'"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    published = {n for n, s in services.items() if s.get("ports")}
    assert "webserver" not in published
    proxy = services["ui-proxy"]
    assert proxy["ports"] == ["127.0.0.1:3000:3000/tcp"]
    # the hash arrives intact (a `$` interpolated away would lock everyone out);
    # `config` writes a literal `$` as `$$`
    assert env_of(proxy)["DAGSTER_UI_PASSWORD_HASH"].replace("$$", "$") == bcrypt
    caddyfile = (ROOT / "deploy/Caddyfile").read_text()
    assert "basic_auth" in caddyfile and "{$DAGSTER_UI_PASSWORD_HASH}" in caddyfile
    assert "reverse_proxy webserver:3000" in caddyfile
    assert any(v.endswith(":/etc/caddy/Caddyfile:ro") for v in proxy["volumes"])
