"""The dev stack's environment and instance choice: what every child process is told."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dlm_pipelines.deployment import (
    POSTGRES_CONFIG,
    SQLITE_CONFIG,
    instance_config,
    prepare_dagster_home,
)
from dlm_pipelines.dev.environment import settings_env
from dlm_pipelines.dev.stack import DevStack
from dlm_pipelines.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_survives_the_trip_through_the_environment(monkeypatch) -> None:
    """A child reading its environment sees exactly the settings the stack was given."""
    defaults = Settings()
    values = {name: getattr(defaults, name) for name in Settings.model_fields}
    values.update(systems=["prince", "scope-9"], sensor_interval_seconds=3, api_tokens="dev:abc")
    explicit = Settings(**values)
    for key in list(os.environ):
        if key.startswith("DLM_"):
            monkeypatch.delenv(key)
    for key, value in settings_env(explicit).items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    read_back = Settings(_env_file=None)  # type: ignore[call-arg]
    for name in Settings.model_fields:
        assert getattr(read_back, name) == getattr(explicit, name), name


def test_children_get_state_paths_credentials_and_no_unreachable_rabbitmq(tmp_path) -> None:
    stack = DevStack(ROOT, tmp_path / "state", settings=Settings(rabbitmq_url="amqp://x"))
    stack.rabbitmq_idle_reason = "nothing answers"
    env = stack.env
    state = tmp_path / "state"
    assert env["DAGSTER_HOME"] == str(state / "dagster")
    assert env["DLM_DATA_ROOT"] == str(state / "data")
    assert env["DLM_DATABASE_URL"] == f"sqlite:///{state / 'catalog.sqlite'}"
    assert env["DLM_API_TOKENS"] == f"dev:{stack.credentials['api_token']}"
    assert env["AWS_SECRET_ACCESS_KEY"] == stack.credentials["s3_secret_key"]
    assert env["DLM_DAGSTER_UI_URL"] == "http://127.0.0.1:3000"
    assert "DLM_RABBITMQ_URL" not in env  # the archive sensor then says why it idles
    # credentials are made once and kept
    assert DevStack(ROOT, state).credentials == stack.credentials


def test_an_explicit_catalog_and_data_root_are_kept(tmp_path) -> None:
    settings = Settings(database_url="postgresql://db/x", data_root=tmp_path / "share")
    env = DevStack(ROOT, tmp_path / "state", settings=settings).env
    assert env["DLM_DATABASE_URL"] == "postgresql://db/x"
    assert env["DLM_DATA_ROOT"] == str(tmp_path / "share")


def test_postgres_storage_is_chosen_by_its_url_alone(tmp_path) -> None:
    assert instance_config(ROOT, None).name == SQLITE_CONFIG
    assert instance_config(ROOT, "postgresql://u@h/dagster").name == POSTGRES_CONFIG
    home = tmp_path / "home"
    prepare_dagster_home(home, ROOT, "postgresql://u@h/dagster")
    assert (home / "dagster.yaml").read_bytes() == (ROOT / POSTGRES_CONFIG).read_bytes()
    prepare_dagster_home(home, ROOT, None)  # rewritten when the choice changes
    assert (home / "dagster.yaml").read_bytes() == (ROOT / SQLITE_CONFIG).read_bytes()
    with pytest.raises(FileNotFoundError, match="project root"):
        instance_config(tmp_path, None)
