"""A bad setting is answered, before any work, with one line per problem naming the
environment variable, the value's problem and an example, and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlm_pipelines.settings import SettingsError, load_settings

DLM = str(Path(sys.executable).parent / "dlm")


def run_dlm(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    return subprocess.run(
        [DLM, *args],
        env=clean | env,
        cwd=tmp_path,  # no developer's .env
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_bad_port_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    result = run_dlm(tmp_path, "api", DLM_API_PORT="abc")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "dlm api: DLM_API_PORT='abc': Input should be a valid integer, unable to parse "
        "string as an integer (e.g. DLM_API_PORT=8000)"
    ]


@pytest.mark.parametrize("command", ["setup", "migrate", "mock-prince", "dev", "api"])
def test_every_command_checks_every_setting_at_start(tmp_path: Path, command: str) -> None:
    result = run_dlm(
        tmp_path,
        command,
        DLM_S3_ENDPOINT_URL="s3.lab.example:8333",
        DLM_REDIS_URL="redis://:hunter2@redis:6379/0",
        DLM_EXPORT_CONCURRENCY="0",
        DLM_RABBITMQ_URL="http://dlm:hunter2@rabbitmq/",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith(f"dlm {command}: DLM_") for line in lines)
    assert any(
        "DLM_S3_ENDPOINT_URL='s3.lab.example:8333': needs a scheme, http:// or https://" in line
        and "(e.g. DLM_S3_ENDPOINT_URL=http://" in line
        for line in lines
    )
    assert any("DLM_EXPORT_CONCURRENCY='0': " in line for line in lines)
    rabbitmq = "DLM_RABBITMQ_URL='http://dlm:***@rabbitmq/': needs a scheme"
    assert any(rabbitmq in line for line in lines)
    assert "hunter2" not in result.stderr  # the valid Redis URL is not even mentioned


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("DLM_DATABASE_URL", "mysql://db/dlm", "needs a scheme, postgresql:// or sqlite://"),
        ("DLM_DAGSTER_POSTGRES_URL", "db:5432/dagster", "needs a scheme"),
        ("DLM_REDIS_URL", "localhost:6379", "needs a scheme, redis://"),
        ("DLM_DAGSTER_UI_URL", "http://", "is not a URL"),
        ("DLM_SYSTEMS", "", "must name at least one system"),
        ("DLM_PURGE_LIFESPAN", "eight hours", "timedelta"),
        ("DLM_API_TOKENS", "x", None),  # parsed by the API, not here
    ],
)
def test_urls_are_typed_and_problems_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, problem: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    if problem is None:
        load_settings()
        return
    with pytest.raises(SettingsError) as caught:
        load_settings()
    (line,) = caught.value.problems
    assert line.startswith(f"{variable}=") and problem in line, line
