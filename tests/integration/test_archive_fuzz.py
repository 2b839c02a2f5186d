"""Fuzzing the archive intake (issue 11, item 6): hostile message bodies through the
real archive_sensor, RabbitMQ and PostgreSQL.

One body per example, published as it is drawn; the sensor ticks every BATCH of them.
After each tick the queue is empty and every body is accounted for: recorded (its
job is in the catalog) or dead-lettered with its body untouched; the sensor never
raised.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from dagster import SensorResult
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlm_pipelines.archive_locations import parse_archive_message
from dlm_pipelines.resources.archive_queue import ArchiveQueue
from tests.integration.test_archive import (
    channel_on,
    definitions,
    jobs,
    ready,
    summary,
    take_all,
    tick,
)

pytestmark = pytest.mark.integration
FUZZ_EXAMPLES = 500
BATCH = 100

NASTY_TEXT = ["", "\u0000", "\ud800", "\udfff", "a" * 300, "../x", "caf\u00e9", " ", "\n"]


def hostile_text() -> st.SearchStrategy[str]:
    return st.sampled_from(NASTY_TEXT) | st.text(max_size=30)


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hostile_text())
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(hostile_text(), children, max_size=3)
        ),
        max_leaves=12,
    )


@st.composite
def archive_items(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["images", "videos", "overview", "weird"]))
    experiment = draw(st.sampled_from(["exp-a", "20261201_Plate042"]) | hostile_text())
    day = draw(st.sampled_from(["20261130", "20261301", "2026113"]))
    item: dict[str, Any] = {
        "path": f"{kind}/{experiment}/{day}.tar",
        "src_keys": [
            f"mycostreams-raw-data/{kind}/{experiment}/{day}/{draw(st.integers(0, 235959)):06d}.tar"
            for _ in range(draw(st.integers(0, 3)))
        ],
    }
    if draw(st.integers(0, 4)) == 2:
        item[draw(st.sampled_from(["path", "src_keys", "extra"]))] = draw(json_values())
    return item


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    # Hypothesis steers its choices towards what breaks: a seeded coin keeps about
    # 40 % of the bodies valid, so recording is exercised as much as rejecting.
    coin = draw(st.randoms(use_true_random=False))
    choice = 6 if coin.random() < 0.4 else draw(st.integers(0, 5))
    if choice == 6:  # a message as the archiver sends it
        return json.dumps(
            {
                "job_id": str(uuid.uuid4()),
                "date": "2026-12-01",
                "archives": [
                    {
                        "path": f"images/exp-{i}/20261130.tar",
                        "src_keys": [f"mycostreams-raw-data/images/exp-{i}/20261130/120000.tar"],
                    }
                    for i in range(draw(st.integers(0, 3)))
                ],
            }
        ).encode()
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        return json.dumps(draw(json_values())).encode()
    if choice == 2:  # nesting the parser cannot follow
        depth = draw(st.sampled_from([50, 5_000, 200_000]))
        return (
            b'{"job_id": "x", "date": "2026-12-01", "archives": '
            + b"[" * depth
            + b"]" * depth
            + b"}"
        )
    document: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "date": draw(st.sampled_from(["2026-12-01", "2026-11-27T00:00:00", "2026-02-30", ""])),
        "archives": draw(st.lists(archive_items(), max_size=3)),
    }
    if choice == 4:
        document["job_id"] = draw(hostile_text() | json_values())
    if choice == 5:
        for name in draw(st.lists(st.sampled_from(sorted(document)), max_size=2, unique=True)):
            document[name] = draw(json_values())
    text = json.dumps(document, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")  # surrogates arrive as \\u escapes anyway


@dataclass
class Harness:
    defs: Any
    instance: Any
    catalog: Any
    queue: ArchiveQueue
    channel: Any
    pending: list[bytes] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, body: bytes) -> None:
        self.channel.basic_publish("", self.queue.queue, body)
        self.pending.append(body)
        self.counts["messages"] += 1
        if len(self.pending) >= BATCH:
            self.tick()

    def tick(self) -> None:
        if not self.pending:
            return
        for _ in range(5):  # a batch may take more than one tick (tick budget)
            result = tick(self.defs, self.instance)  # raises if the sensor raises
            assert isinstance(result, SensorResult) or "no archive" in summary(result)
            if ready(self.queue.url or "", self.queue.queue) == 0:
                break
        assert ready(self.queue.url or "", self.queue.queue) == 0, "the queue is blocked"
        dead = Counter(
            body for _, body in take_all(self.queue.url or "", self.queue.dead_letter_queue)
        )
        recorded = []
        for body in self.pending:
            if dead[body]:
                dead[body] -= 1
                self.counts["dead_lettered"] += 1
                continue
            recorded.append(parse_archive_message(body).job_id)  # it must have parsed
        found = {j.job_id for j in jobs(self.catalog, recorded)}
        assert set(recorded) <= found, "a message was acked but not recorded"
        self.counts["recorded"] += len(recorded)
        self.pending.clear()


def test_no_archive_body_blocks_the_queue_and_every_one_is_accounted_for(
    catalog, rabbitmq_url, dagster_instance
) -> None:
    name = f"dlm-test-archive-fuzz-{uuid.uuid4().hex[:10]}"
    queue = ArchiveQueue(
        url=rabbitmq_url, queue=name, dead_letter_queue=f"{name}.dead-letter", timeout_seconds=5
    )
    with queue.connect():
        pass  # declares the queues
    examples = max(FUZZ_EXAMPLES, settings.default.max_examples // 2)
    try:
        with channel_on(rabbitmq_url) as channel:
            harness = Harness(
                definitions(catalog, queue), dagster_instance, catalog, queue, channel
            )

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(body=bodies())
            def one_body(body: bytes) -> None:
                harness.add(body)

            one_body()
            harness.tick()
        counts = harness.counts
        print(f"archive fuzz: {dict(counts)}")
        assert counts["recorded"] + counts["dead_lettered"] == counts["messages"] >= examples
        assert counts["recorded"] > 0 and counts["dead_lettered"] > 0
    finally:
        with channel_on(rabbitmq_url) as channel:
            channel.queue_delete(queue.queue)
            channel.queue_delete(queue.dead_letter_queue)
