"""Shared fixtures. Integration fixtures use real services and fail loudly when one is
missing: nothing here skips."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TEST_ACCESS_KEY = "dlm-test"
TEST_SECRET_KEY = "dlm-test-secret"

POSTGRES_ADMIN_URL = os.environ.get(
    "DLM_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("DLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("DLM_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="session", autouse=True)
def _aws_credentials() -> Iterator[None]:
    """boto3 reads these; tests never talk to AWS."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = TEST_ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = TEST_SECRET_KEY
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory):
    from dlm_pipelines.dev.seaweedfs import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), TEST_ACCESS_KEY, TEST_SECRET_KEY)
    try:
        server.start()
    except Exception as exc:
        server.stop()
        pytest.fail(f"SeaweedFS could not start: {exc}")
    yield server
    server.stop()


@pytest.fixture
def object_store(seaweedfs):
    """An ObjectStore on a fresh bucket."""
    from dlm_pipelines.resources import ObjectStore

    store = ObjectStore(
        bucket=f"dlm-test-{uuid.uuid4().hex[:12]}",
        endpoint_url=seaweedfs.endpoint_url,
        part_size_mib=5,
    )
    seaweedfs.wait_ready(60)  # a test may have restarted it
    store.ensure_bucket()
    return store


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped at the end."""
    import sqlalchemy as sa

    from tests.postgres import temporary_database

    try:
        sa.create_engine(POSTGRES_ADMIN_URL).connect().close()
    except Exception as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    with temporary_database(POSTGRES_ADMIN_URL, "dlm_test") as url:
        yield url


@pytest.fixture
def catalog(postgres_url: str):
    """The catalog on PostgreSQL, migrated, emptied for each test."""
    import sqlalchemy as sa

    from dlm_pipelines.catalog import Catalog, migrate

    catalog = Catalog(database_url=postgres_url)
    migrate(catalog.database_url)
    with catalog.engine.begin() as conn:
        tables = [t for t in sa.inspect(conn).get_table_names() if t != "alembic_version"]
        if tables:
            conn.execute(sa.text(f"TRUNCATE {', '.join(tables)} CASCADE"))
    return catalog


@pytest.fixture
def streams():
    """Redis streams with names unique to the test, deleted afterwards."""
    import redis

    from dlm_pipelines.resources import RedisStreams

    prefix = f"dlm-test:{uuid.uuid4().hex[:8]}"
    resource = RedisStreams(
        url=REDIS_URL,
        imaging_event_stream=f"{prefix}:new-imaging-event",
        export_stream=f"{prefix}:new-export",
        dead_letter_stream=f"{prefix}:dead-letter",
    )
    try:
        resource.client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
    yield resource
    resource.client.delete(
        resource.imaging_event_stream, resource.export_stream, resource.dead_letter_stream
    )


@pytest.fixture
def data_root(tmp_path: Path):
    from dlm_pipelines.resources import DataRoot

    root = tmp_path / "data"
    root.mkdir()
    return DataRoot(path=str(root))


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The RabbitMQ broker; tests use queues of their own and delete them."""
    import pika

    try:
        pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL)).close()
    except Exception as exc:
        pytest.fail(f"RabbitMQ is not reachable at {RABBITMQ_URL}: {exc!r}")
    return RABBITMQ_URL


@pytest.fixture
def dagster_instance():
    from dagster import instance_for_test

    with instance_for_test() as instance:
        yield instance


# Hypothesis: `--hypothesis-profile=long` for a deep run of the fuzz tests (the
# intake fuzz takes max(2,000, max_examples) examples, the archive fuzz half that;
# give it `--timeout=3600`). `make test` uses hypothesis's defaults.
from hypothesis import settings as hypothesis_settings  # noqa: E402

hypothesis_settings.register_profile("long", max_examples=10_000, deadline=None)
