"""Dagster's PostgreSQL instance storage as shipped (dagster.postgres.yaml): pooled sessions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from dagster import AssetKey, AssetMaterialization, DagsterInstance

from dlm_pipelines.deployment import prepare_dagster_home
from tests.postgres import DEFAULT_ADMIN_URL, temporary_database

ROOT = Path(__file__).resolve().parents[2]
KEY = AssetKey("pooled_storage_probe")
TICKS = 10
OPERATIONS_PER_TICK = 5


def postgres_instance(home: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> DagsterInstance:
    monkeypatch.setenv("DLM_DAGSTER_POSTGRES_URL", url)
    prepare_dagster_home(home, ROOT, url)
    return DagsterInstance.from_config(str(home))


def sessions_opened(database: str) -> int:
    """Sessions the server has counted for the database (a backend reports its own
    when it ends or within its stats flush interval)."""
    engine = sa.create_engine(DEFAULT_ADMIN_URL, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT sessions FROM pg_stat_database WHERE datname = :name"),
                {"name": database},
            ).scalar_one()
    finally:
        engine.dispose()


def test_instances_of_a_process_share_one_session(tmp_path, monkeypatch):
    with temporary_database(prefix="dlm_instance") as url:
        database = url.rsplit("/", 1)[1]
        # The first instance creates the tables of a fresh database.
        with postgres_instance(tmp_path / "home", url, monkeypatch) as instance:
            instance.report_runless_asset_event(AssetMaterialization(KEY, metadata={"tick": -1}))
            time.sleep(1.5)  # the first session's count is flushed
            before = sessions_opened(database)
            # As a code server's sensor ticks: a fresh instance each, several operations.
            for tick in range(TICKS):
                with DagsterInstance.from_ref(instance.get_ref()) as tick_instance:
                    for _ in range(OPERATIONS_PER_TICK):
                        tick_instance.report_runless_asset_event(
                            AssetMaterialization(KEY, metadata={"tick": tick})
                        )
                        latest = tick_instance.get_latest_materialization_event(KEY)
            time.sleep(1.5)  # sessions that ended are counted
            opened = sessions_opened(database) - before

    assert latest is not None
    materialization = latest.asset_materialization
    assert materialization is not None
    assert materialization.metadata["tick"].value == TICKS - 1
    # dagster-postgres alone opens one per operation and three per instance: over 100.
    assert opened <= 1, f"{opened} new sessions for {TICKS * OPERATIONS_PER_TICK * 2} operations"
