"""Alembic environment for the catalog. The engine comes from `catalog.migrate`."""

from alembic import context
from sqlmodel import SQLModel

from dlm_pipelines import catalog

target_metadata = SQLModel.metadata


def run_migrations() -> None:
    engine = context.config.attributes.get("engine")
    if engine is None:
        from dlm_pipelines.settings import get_settings

        engine = catalog.get_engine(get_settings().database_url)
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite needs batch mode for ALTER TABLE
        )
        context.run_migrations()


run_migrations()
