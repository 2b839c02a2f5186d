"""The whole DLM as real processes: dagster-daemon and webserver on PostgreSQL storage,
the API, SeaweedFS, Redis and RabbitMQ. One stack for the whole e2e session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_ADMIN_URL, REDIS_URL

PURGE_LIFESPAN = timedelta(seconds=20)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str) -> Iterator:
    from dlm_pipelines.dev.seaweedfs import free_port_block
    from dlm_pipelines.dev.stack import DevStack
    from dlm_pipelines.settings import Settings
    from tests.postgres import temporary_database

    state = tmp_path_factory.mktemp("stack")
    prefix = f"dlm-e2e:{uuid.uuid4().hex[:8]}"
    with (
        temporary_database(POSTGRES_ADMIN_URL, "dlm_e2e_catalog") as catalog_url,
        temporary_database(POSTGRES_ADMIN_URL, "dlm_e2e_dagster") as dagster_url,
    ):
        settings = Settings(
            redis_url=REDIS_URL,
            database_url=catalog_url,
            dagster_postgres_url=dagster_url,
            data_root=state / "data",
            s3_bucket=f"dlm-e2e-{uuid.uuid4().hex[:8]}",
            imaging_event_stream=f"{prefix}:new-imaging-event",
            export_stream=f"{prefix}:new-export",
            dead_letter_stream=f"{prefix}:dead-letter",
            rabbitmq_url=rabbitmq_url,
            archive_queue=f"dlm-e2e-{uuid.uuid4().hex[:8]}",
            archive_dead_letter_queue=f"dlm-e2e-dead-{uuid.uuid4().hex[:8]}",
            sensor_interval_seconds=1,
            # A month of partitions: empty_partition_sensor closes them in its first tick.
            partition_start_date=date.today() - timedelta(days=30),
            export_linger_seconds=3,  # warm runs, short enough for the tests to see them end
            export_retry_delay_seconds=0.5,
            # short liveness limits, so the daemon-kill test need not wait minutes
            export_heartbeat_seconds=2,
            export_stale_after_seconds=30,
            sensor_sweep_after_seconds=20,
            purge_cron="* * * * *",
            purge_timezone="UTC",
            purge_lifespan=PURGE_LIFESPAN,
            purge_systems=["prince"],
        )
        ports = free_port_block(2)  # outside the ephemeral range
        dev = DevStack(
            Path(__file__).parents[2], state, settings=settings, ui_port=ports, api_port=ports + 1
        )
        try:
            dev.start(mock_prince_args=None)
            yield dev
        finally:
            dev.stop()
            _delete_queues(rabbitmq_url, settings.archive_queue, settings.archive_dead_letter_queue)
            import redis

            redis.Redis.from_url(REDIS_URL).delete(
                settings.imaging_event_stream, settings.export_stream, settings.dead_letter_stream
            )


def _delete_queues(url: str, *queues: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for queue in queues:
        channel.queue_delete(queue=queue)
    connection.close()
