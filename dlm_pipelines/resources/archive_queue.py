"""The RabbitMQ queue on which the tape archiver announces archive files (docs/contracts.md §4).

One short connection per sensor tick: declare the topology, take a bounded batch
with `basic_get`, ack each message only after the catalog has committed it. A
message that cannot be parsed is copied, body untouched, to a dead-letter queue
with the reason in its headers, and only then acked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pika
import pika.exceptions
from dagster import ConfigurableResource
from pika.adapters.blocking_connection import BlockingChannel

from dlm_pipelines.catalog import utcnow
from dlm_pipelines.settings import hide_password

# Declared exactly as the archiver declares it: fanout, NOT durable (a durable
# declaration of the existing exchange fails with PRECONDITION_FAILED).
ARCHIVE_EXCHANGE = "surf-data-archive"
REASON_HEADER = "x-dlm-reason"


class BrokerError(RuntimeError):
    """RabbitMQ is unreachable or refused an operation; the text says why (no password)."""


@dataclass(frozen=True)
class Delivery:
    tag: int
    body: bytes
    properties: pika.BasicProperties
    redelivered: bool


@contextmanager
def _broker_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except (pika.exceptions.AMQPError, OSError) as exc:
        detail = str(exc) or repr(exc)
        raise BrokerError(f"{doing}: {type(exc).__name__} {detail}") from exc


class ArchiveQueue(ConfigurableResource):
    """DLM's durable queue bound to the archiver's exchange, and its dead-letter queue."""

    url: str | None = None  # None: not configured
    queue: str = "dlm-archive-locations"
    dead_letter_queue: str = "dlm-archive-locations.dead-letter"
    timeout_seconds: float = 10.0  # bounds connecting and every broker round trip

    @property
    def connection_name(self) -> str:
        """Shown by `rabbitmqctl list_connections` and the management UI."""
        return f"dlm-archive-sensor:{self.queue}"

    @contextmanager
    def connect(self) -> Iterator[ArchiveInbox]:
        """Connect and declare; unacked messages go back to the queue when this closes."""
        if not self.url:
            raise BrokerError("no RabbitMQ URL configured (DLM_RABBITMQ_URL)")
        params = pika.URLParameters(self.url)
        params.connection_attempts = 1
        params.socket_timeout = self.timeout_seconds
        params.stack_timeout = self.timeout_seconds
        params.blocked_connection_timeout = self.timeout_seconds
        params.client_properties = {"connection_name": self.connection_name}
        with _broker_errors(f"cannot connect to RabbitMQ at {hide_password(self.url)}"):
            connection = pika.BlockingConnection(params)
        try:
            with _broker_errors(f"cannot declare the queues on {hide_password(self.url)}"):
                channel = connection.channel()
                channel.exchange_declare(ARCHIVE_EXCHANGE, exchange_type="fanout", durable=False)
                channel.queue_declare(self.queue, durable=True)
                # Re-bound on every connection: a non-durable exchange and its bindings
                # vanish when the broker restarts.
                channel.queue_bind(self.queue, ARCHIVE_EXCHANGE)
                channel.queue_declare(self.dead_letter_queue, durable=True)
                channel.confirm_delivery()  # a dead letter is acked only once it is stored
            yield ArchiveInbox(channel, self.queue, self.dead_letter_queue)
        finally:
            # Already gone is fine: the broker requeues whatever was not acked.
            with suppress(pika.exceptions.AMQPError, OSError):
                if connection.is_open:
                    connection.close()


@dataclass
class ArchiveInbox:
    """One open channel on the archive queue."""

    channel: BlockingChannel
    queue: str
    dead_letter_queue: str

    def take(self, limit: int) -> Iterator[Delivery]:
        """Up to `limit` messages, one `basic_get` at a time, none acked yet."""
        for _ in range(limit):
            with _broker_errors(f"lost RabbitMQ while reading {self.queue}"):
                method, properties, body = self.channel.basic_get(self.queue, auto_ack=False)
            if method is None:
                return
            yield Delivery(method.delivery_tag, body, properties, bool(method.redelivered))

    def ack(self, delivery: Delivery) -> None:
        with _broker_errors(f"lost RabbitMQ before acking message {delivery.tag}"):
            self.channel.basic_ack(delivery.tag)

    def dead_letter(self, delivery: Delivery, reason: str, at: datetime | None = None) -> None:
        """Keep the message, body as it came, with the reason; then ack the original."""
        original = delivery.properties
        headers: dict[str, Any] = dict(original.headers or {})
        headers.update(
            {
                REASON_HEADER: reason[:4000],
                "x-dlm-source-queue": self.queue,
                "x-dlm-dead-lettered-at": (at or utcnow()).isoformat(),
            }
        )
        properties = pika.BasicProperties(
            content_type=original.content_type,
            content_encoding=original.content_encoding,
            message_id=original.message_id,
            timestamp=original.timestamp,
            app_id=original.app_id,
            headers=headers,
            delivery_mode=pika.DeliveryMode.Persistent,
        )
        with _broker_errors(f"could not dead-letter message {delivery.tag}"):
            self.channel.basic_publish(
                "", self.dead_letter_queue, delivery.body, properties, mandatory=True
            )
        self.ack(delivery)
