"""Throw-away PostgreSQL databases for tests, benchmarks and the end-to-end stack."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


@contextmanager
def temporary_database(
    admin_url: str = DEFAULT_ADMIN_URL, prefix: str = "dlm_tmp"
) -> Iterator[str]:
    """Create a database with a unique name, yield its URL, drop it (forcibly) after."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = admin_url.rsplit("/", 1)[0] + f"/{name}"
        try:
            yield url
        finally:
            from dlm_pipelines.catalog import get_engine

            get_engine(url).dispose()
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
