"""Dagster instance storage in PostgreSQL over one pooled engine per process.

dagster-postgres opens a new PostgreSQL session for every storage operation (SQLAlchemy's
NullPool) so that a short-lived `DagsterInstance` never holds a connection, and each
instance first inspects the database for its tables. In this deployment that cost about
27 new sessions a second on an idle stack, each a forked PostgreSQL backend of a few ms of
server CPU: the daemon's operations, and a code server's fresh instance at every sensor
tick. `PooledPostgresStorage` is dagster-postgres's storage whose run, event-log and
schedule storages share their process's pooled engine: a process keeps two idle sessions,
opens more only while its threads overlap, and checks for the tables once.

Selected by `dagster.postgres.yaml`; the configuration is dagster-postgres's own.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage
from dagster_postgres.schedule_storage import PostgresScheduleStorage
from dagster_postgres.utils import (
    create_pg_engine,
    get_token_provider_from_config,
    pg_url_from_config,
)

if TYPE_CHECKING:
    from dagster._serdes import ConfigurableClassData
    from dagster_postgres.auth import PgTokenProvider
    from sqlalchemy.engine import Engine

# Sessions kept open per process: two, since an event write checks an index on a second
# connection while its transaction holds the first. Overlapping threads may open more.
POOL_SIZE = 2
MAX_OVERFLOW = 20
# Renew a session after an hour; test it before each use, so that a PostgreSQL restart
# costs a reconnect rather than a failed operation.
POOL_RECYCLE_SECONDS = 3600

# Keyed by process too: a forked child must not share its parent's sockets.
_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


class PooledPostgresStorage(DagsterPostgresStorage):
    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: PgTokenProvider | None = None,
    ):
        self.postgres_url = postgres_url
        self.should_autocreate_tables = should_autocreate_tables
        self._inst_data = inst_data
        key = (os.getpid(), postgres_url)
        with _engines_lock:
            engine = _engines.get(key)
            # Only a process's first instance looks for missing tables (and creates
            # them); the lock holds the others until it has. If it fails, the next tries.
            create = should_autocreate_tables and engine is None
            self._run_storage = PostgresRunStorage(
                postgres_url, create, token_provider=token_provider
            )
            self._event_log_storage = PostgresEventLogStorage(
                postgres_url, create, token_provider=token_provider
            )
            self._schedule_storage = PostgresScheduleStorage(
                postgres_url, create, token_provider=token_provider
            )
            if engine is None:
                engine = _engines[key] = pooled_engine(postgres_url, token_provider)
        for storage in (self._run_storage, self._event_log_storage, self._schedule_storage):
            storage._engine = engine  # in place of its NullPool engine, which holds nothing
        super(DagsterPostgresStorage, self).__init__()  # skips the parent: built above

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> PooledPostgresStorage:
        return cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )


def pooled_engine(postgres_url: str, token_provider: PgTokenProvider | None) -> Engine:
    return create_pg_engine(
        postgres_url,
        token_provider,
        isolation_level="AUTOCOMMIT",  # as dagster-postgres: every statement commits
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_recycle=POOL_RECYCLE_SECONDS,
        pool_pre_ping=True,
    )
