-- The catalog lives in database `dlm` (POSTGRES_DB); the Dagster instance gets its
-- own database, since both use a table named alembic_version.
CREATE DATABASE dagster;
