"""Archive notifications: messages per second through `archive_sensor`, against a bare
pika `basic_get` + `basic_ack` loop over the same number of messages.

    python -m bench archive [--messages=N] [--keys=K] [--reps=R]

(Options take the `--name=value` form: `python -m bench` reads bare words as names.)

Uses the local RabbitMQ and PostgreSQL (a throwaway database, dropped at the end).
Each repetition, in alternating order:

- sensor: N messages (one archive of K exports each, all catalogued) wait in a queue
  of the bench's own; the timed part is ticks of `archive_sensor` (evaluated with
  `build_sensor_context` against a real instance, its runless materialisations
  stored as the daemon stores them) until a tick finds the queue empty;
- bare:   the same N bodies in a second queue, drained by one connection doing
  `basic_get` + `basic_ack`: the broker's own round-trip cost.

Publishing and seeding the catalog are not timed. Messages go straight to the
bench's queues (default exchange), never through `surf-data-archive`, so no other
queue bound to it receives them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import pika
import sqlalchemy as sa
from dagster import SensorResult, build_sensor_context, instance_for_test

from dlm_pipelines.catalog import EVENTS, Catalog, migrate
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.events import parse_imaging_event
from dlm_pipelines.partitions import partition_key_for
from dlm_pipelines.settings import Settings
from tests.postgres import temporary_database

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
BUCKET = "mycostreams-raw-data"
DAY = datetime(2026, 11, 30, 12, tzinfo=UTC)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench archive")
    parser.add_argument("--messages", type=int, default=1000, help="per repetition")
    parser.add_argument("--keys", type=int, default=2, help="src_keys per message")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (at least 5)")
    parser.add_argument(
        "--rabbitmq-url",
        default=os.environ.get("DLM_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "DLM_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
        ),
        help="admin URL; the bench creates and drops its own database",
    )
    return parser.parse_args(argv)


def seed_exports(catalog: Catalog, rep: int, messages: int, keys: int) -> list[bytes]:
    """Catalogue messages × keys exports and return one message body per archive."""
    with open(os.path.join(FIXTURE, "imaging_event_stitch.json")) as f:
        template = json.load(f)
    bodies, items, assigned = [], [], []
    for m in range(messages):
        experiment = f"bench-r{rep}-m{m}"
        src_keys = []
        for k in range(keys):
            ts = DAY + timedelta(seconds=30 * k)
            fields = {
                **template,
                "ref_id": str(uuid.uuid4()),
                "experiment_id": experiment,
                "timestamp": ts.isoformat(),
            }
            event = parse_imaging_event(fields, ("prince",))
            items.append((event, "1-0", partition_key_for(event)))
            assigned.append({"rid": event.ref_id, "key": event.object_key})
            src_keys.append(f"{BUCKET}/{event.object_key}")
        document = {
            "job_id": str(uuid.uuid4()),
            "date": "2026-12-01",
            "archives": [{"path": f"images/{experiment}/20261130.tar", "src_keys": src_keys}],
        }
        bodies.append(json.dumps(document, indent=4).encode())
    catalog.record_events(items)
    table = EVENTS
    with catalog.engine.begin() as conn:
        conn.execute(
            sa.update(table)
            .where(table.c.ref_id == sa.bindparam("rid"))
            .values(bucket=BUCKET, object_key=sa.bindparam("key")),
            assigned,
        )
    return bodies


def publish(url: str, queue: str, bodies: list[bytes]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    channel.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    for body in bodies:
        channel.basic_publish("", queue, body, persistent)
    connection.close()


def drain_with_sensor(defs, instance) -> tuple[float, int]:
    sensor = defs.get_sensor_def("archive_sensor")
    started, ticks = time.perf_counter(), 0
    while True:
        ticks += 1
        with build_sensor_context(
            instance=instance, resources=defs.resources, definitions=defs
        ) as context:
            result = sensor(context)
        assert isinstance(result, SensorResult), result
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
        message = result.skip_reason.skip_message if result.skip_reason else ""
        if (message or "").startswith("no archive notifications"):
            return time.perf_counter() - started, ticks
        assert "; 0 dead-lettered" in (message or ""), message
        assert "stopped early" not in (message or ""), message


def drain_bare(url: str, queue: str) -> tuple[float, int]:
    started, taken = time.perf_counter(), 0
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    while True:
        method, _, _ = channel.basic_get(queue, auto_ack=False)
        if method is None:
            break
        channel.basic_ack(method.delivery_tag)
        taken += 1
    connection.close()
    return time.perf_counter() - started, taken


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.reps < 5:
        print("--reps must be at least 5 (paired ratios need repetitions)")
        return 2
    with temporary_database(args.postgres_url, "dlm_bench_archive") as database_url:
        return measure(args, database_url)


def measure(args: argparse.Namespace, database_url: str) -> int:
    name = f"dlm-bench-archive-{uuid.uuid4().hex[:8]}"
    bare_queue = f"{name}.bare"
    settings = Settings(
        database_url=database_url,
        rabbitmq_url=args.rabbitmq_url,
        archive_queue=name,
        archive_dead_letter_queue=f"{name}.dead-letter",
        partition_start_date="2026-01-01",
    )
    catalog = Catalog(database_url=database_url)
    migrate(catalog.database_url)
    defs = build_definitions(settings)
    print(
        f"{args.messages} messages × {args.keys} keys per repetition, "
        f"batch {settings.archive_batch_size} per tick, {args.reps} repetitions"
    )
    print(
        f"{'rep':>3} {'first':>6} {'sensor s':>9} {'msg/s':>8} {'ticks':>5} "
        f"{'bare s':>8} {'msg/s':>8} {'sensor/bare':>11}"
    )
    sensor_rates, bare_rates, ratios = [], [], []
    try:
        with instance_for_test() as instance:
            for rep in range(args.reps):
                bodies = seed_exports(catalog, rep, args.messages, args.keys)
                publish(args.rabbitmq_url, name, bodies)
                publish(args.rabbitmq_url, bare_queue, bodies)
                runs = {}
                order = ("sensor", "bare") if rep % 2 == 0 else ("bare", "sensor")
                for variant in order:
                    if variant == "sensor":
                        runs[variant] = drain_with_sensor(defs, instance)
                    else:
                        runs[variant] = drain_bare(args.rabbitmq_url, bare_queue)
                (sensor_s, ticks), (bare_s, taken) = runs["sensor"], runs["bare"]
                assert taken == args.messages, f"bare loop took {taken}"
                sensor_rates.append(args.messages / sensor_s)
                bare_rates.append(args.messages / bare_s)
                ratios.append(sensor_s / bare_s)
                print(
                    f"{rep:>3} {order[0]:>6} {sensor_s:>9.3f} {sensor_rates[-1]:>8.0f} "
                    f"{ticks:>5} {bare_s:>8.3f} {bare_rates[-1]:>8.0f} {ratios[-1]:>11.1f}"
                )
            with catalog.engine.connect() as conn:
                jobs = conn.execute(sa.text("SELECT count(*) FROM archive_job")).scalar_one()
                archived = conn.execute(
                    sa.text("SELECT count(*) FROM imaging_event WHERE archive_path IS NOT NULL")
                ).scalar_one()
        expected = args.reps * args.messages
        print(
            f"median: sensor {statistics.median(sensor_rates):.0f} msg/s, bare pika "
            f"{statistics.median(bare_rates):.0f} msg/s, sensor/bare time "
            f"{statistics.median(ratios):.1f}× (catalog: {jobs}/{expected} jobs, "
            f"{archived}/{expected * args.keys} exports archived)"
        )
        return 0 if jobs == expected and archived == expected * args.keys else 1
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(args.rabbitmq_url))
        channel = connection.channel()
        for queue in (name, bare_queue, settings.archive_dead_letter_queue):
            channel.queue_delete(queue)
        connection.close()
