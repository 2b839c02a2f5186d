"""The catalog's state machine on PostgreSQL: claims are exclusive, stale ones are taken over."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dlm_pipelines.catalog import Catalog, EventStatus, migrate
from dlm_pipelines.events import parse_imaging_event
from dlm_pipelines.partitions import partition_key_for
from tests.integration.helpers import make_event

pytestmark = pytest.mark.integration
SYSTEMS = ("prince", "tsu-exp002", "tsu-exp003")


def record(catalog: Catalog, tmp_path: Path) -> str:
    event = parse_imaging_event(make_event(tmp_path, write=False), SYSTEMS)
    assert catalog.record_events([(event, "1-0", partition_key_for(event))]) == {event.ref_id}
    return event.ref_id


@pytest.fixture(params=["postgresql", "sqlite"])
def any_catalog(request, tmp_path: Path) -> Catalog:
    """The catalog on each backend intake writes differently to."""
    if request.param == "postgresql":
        return request.getfixturevalue("catalog")
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    migrate(url)
    return Catalog(database_url=url)


def test_record_is_idempotent_and_keeps_the_first(any_catalog: Catalog, tmp_path: Path) -> None:
    catalog = any_catalog
    fields = make_event(tmp_path, write=False)
    event = parse_imaging_event(fields, SYSTEMS)
    assert catalog.record_events([(event, "1-0", partition_key_for(event))]) == {event.ref_id}
    assert catalog.record_events([(event, "2-0", partition_key_for(event))]) == set()
    stored = catalog.get(event.ref_id)
    assert stored.stream_id == "1-0" and stored.status == EventStatus.RECEIVED
    assert stored.timestamp.tzinfo is not None and stored.received_at.tzinfo is not None
    assert stored.timestamp == event.timestamp
    assert (stored.system, stored.experiment_id, stored.event_type) == (
        event.system,
        event.experiment_id,
        event.type.value,
    )
    assert (stored.local_path, stored.img_count) == (event.local_path, event.img_count)
    assert stored.partition_key == partition_key_for(event)
    assert stored.event_metadata == event.metadata.model_dump(mode="json")
    assert (stored.attempts, stored.key_collision, stored.run_id) == (0, False, None)

    # a batch: new events among a known one and a repeat within the batch
    others = [parse_imaging_event(make_event(tmp_path, write=False), SYSTEMS) for _ in range(3)]
    batch = [(e, f"3-{i}", partition_key_for(e)) for i, e in enumerate([event, *others])]
    batch.append((others[0], "3-9", partition_key_for(others[0])))
    assert catalog.record_events(batch) == {e.ref_id for e in others}
    assert catalog.get(others[0].ref_id).stream_id == "3-1"
    assert catalog.statuses([event.ref_id, others[1].ref_id, "unknown"]) == {
        event.ref_id: EventStatus.RECEIVED,
        others[1].ref_id: EventStatus.RECEIVED,
    }


def test_concurrent_claims_have_one_winner(catalog: Catalog, tmp_path: Path) -> None:
    ref_id = record(catalog, tmp_path)
    barrier = threading.Barrier(8)
    winners: list[str] = []

    def claim(run_id: str) -> None:
        barrier.wait()
        if catalog.claim(ref_id, run_id, force=False, run_is_alive=lambda _: True):
            winners.append(run_id)

    threads = [threading.Thread(target=claim, args=(f"run-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert catalog.get(ref_id).run_id == winners[0]


def test_a_live_claim_is_respected_and_a_dead_one_taken_over(catalog: Catalog, tmp_path) -> None:
    ref_id = record(catalog, tmp_path)
    assert catalog.claim(ref_id, "run-a", force=False, run_is_alive=lambda _: True)
    assert not catalog.claim(ref_id, "run-b", force=False, run_is_alive=lambda _: True)
    assert catalog.claim(ref_id, "run-b", force=False, run_is_alive=lambda run: run != "run-a")
    assert catalog.get(ref_id).run_id == "run-b" and catalog.get(ref_id).attempts == 2
    # the old holder can no longer mark it verified or failed
    assert catalog.mark_verified(ref_id, "run-a", size=1, sha256="0" * 64) is None
    catalog.mark_failed(ref_id, "run-a", "late")
    assert catalog.get(ref_id).status == EventStatus.EXPORTING


def test_verified_is_only_reclaimed_when_forced(catalog: Catalog, tmp_path) -> None:
    ref_id = record(catalog, tmp_path)
    assert catalog.claim(ref_id, "run-a", force=False, run_is_alive=lambda _: False)
    assert catalog.mark_verified(ref_id, "run-a", size=10, sha256="a" * 64) is not None
    assert not catalog.claim(ref_id, "run-b", force=False, run_is_alive=lambda _: False)
    assert catalog.claim(ref_id, "run-b", force=True, run_is_alive=lambda _: False)


def test_unique_object_keys(catalog: Catalog, tmp_path) -> None:
    first, second = record(catalog, tmp_path), record(catalog, tmp_path)
    assert catalog.assign_key(first, "bucket", "images/e/20261201/120000.tar", collision=False)
    assert not catalog.assign_key(second, "bucket", "images/e/20261201/120000.tar", collision=False)
    assert catalog.assign_key(
        second, "other-bucket", "images/e/20261201/120000.tar", collision=False
    )


def test_migrations_run_on_sqlite_too(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    migrate(url)
    migrate(url)  # idempotent
    catalog = Catalog(database_url=url)
    ref_id = record(catalog, tmp_path)
    assert catalog.claim(ref_id, "run-a", force=False, run_is_alive=lambda _: True)
    assert catalog.get(ref_id).claimed_at.tzinfo == UTC
    assert catalog.get(ref_id).claimed_at <= datetime.now(UTC)


def test_the_sensors_sweep_and_claims_read_only_the_unfinished_index(
    catalog: Catalog, tmp_path: Path
) -> None:
    """The sweep and the claims check run every tick: their statements, as the catalog
    sends them, are answered from the partial index of unfinished events (migration
    0007), so their cost follows the work in flight, not the catalog's size."""
    import sqlalchemy as sa

    ref_id = record(catalog, tmp_path)
    record(catalog, tmp_path)
    assert catalog.claim(ref_id, "run-a", force=False, run_is_alive=lambda _: True)
    sent: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("SELECT DISTINCT"):
            sent.append((statement, parameters))

    sa.event.listen(catalog.engine, "before_cursor_execute", capture)
    try:
        assert catalog.stale_partitions(datetime.now(UTC)) != []
        assert [run for _, run in catalog.claims()] == ["run-a"]
    finally:
        sa.event.remove(catalog.engine, "before_cursor_execute", capture)
    assert len(sent) == 2
    with catalog.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")  # a tiny table: plan as if large
        for statement, parameters in sent:
            plan = "\n".join(
                row[0] for row in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
            )
            assert "Index Only Scan using ix_imaging_event_unfinished" in plan, plan
