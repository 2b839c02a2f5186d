"""The reconciler's pure parts: the sorted merge, the prefetching listing, severities,
finding identity and the asset check evaluations built from a report."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from dagster import AssetCheckSeverity, AssetKey

from dlm_pipelines.jobs.reconcile import CHECK, UNOWNED_CHECK, check_evaluations
from dlm_pipelines.reconciler import (
    CONTRACT_KEY_RE,
    Finding,
    Kind,
    ListedObject,
    Severity,
    _merge,
    prefetched,
)

WHEN = datetime(2026, 12, 1, tzinfo=UTC)


def listed(*keys: str) -> Iterator[ListedObject]:
    return iter([ListedObject(k, 1, "e", WHEN) for k in keys])


def rows(*keys: str) -> Iterator[SimpleNamespace]:
    return iter([SimpleNamespace(object_key=k) for k in keys])


def test_merge_pairs_equal_keys_and_keeps_every_unmatched_one_in_order() -> None:
    pairs = _merge(listed("a", "b/1", "c", "e"), rows("b-2", "b/1", "d", "e"))
    assert [
        (o.key if o else None, r.object_key if r else None) for o, r in pairs
    ] == [
        ("a", None),
        (None, "b-2"),  # '-' sorts before '/': byte order on both sides
        ("b/1", "b/1"),
        ("c", None),
        (None, "d"),
        ("e", "e"),
    ]  # fmt: skip
    assert list(_merge(listed(), rows())) == []


def test_prefetched_yields_every_page_in_order_and_raises_the_producers_error() -> None:
    pages = [[1, 2], [], [3]]
    assert list(prefetched(iter(pages))) == [1, 2, 3]

    def broken() -> Iterator[list[int]]:
        yield [1]
        raise ConnectionError("listing failed")

    got = []
    with pytest.raises(ConnectionError, match="listing failed"):
        for item in prefetched(broken()):
            got.append(item)
    assert got == [1]


def test_prefetched_stops_its_thread_when_the_consumer_stops_early() -> None:
    produced = []

    def endless() -> Iterator[list[int]]:
        n = 0
        while True:
            produced.append(n)
            yield [n]
            n += 1

    items = prefetched(endless(), depth=2)
    assert next(items) == 0
    items.close()
    threading.Event().wait(1.5)  # the producer notices within its 0.5 s put timeout
    settled = len(produced)
    threading.Event().wait(1.0)
    assert len(produced) == settled < 10  # bounded look-ahead, then stopped


def test_severities() -> None:
    assert Finding(Kind.OBJECT_MISSING, "x").severity == Severity.ALARM
    assert Finding(Kind.SOURCE_MISSING, "x").severity == Severity.ALARM
    assert Finding(Kind.STUCK, "failed since ...").severity == Severity.ALARM
    assert Finding(Kind.STUCK, "needs_attention: ...").severity == Severity.ALARM
    assert Finding(Kind.STUCK, "received since ...").severity == Severity.WARNING
    assert Finding(Kind.OBJECT_WITHOUT_EVENT, "x").severity == Severity.WARNING
    assert Finding(Kind.ARCHIVE_RECOVERED, "x").severity == Severity.INFO


def test_a_finding_is_the_same_across_reports_whatever_its_detail() -> None:
    one = Finding(Kind.OBJECT_MISMATCH, "size 1 != 2", ref_id="r", key="k")
    assert (
        one.open_key
        == Finding(Kind.OBJECT_MISMATCH, "sha256 differs", ref_id="r", key="k").open_key
    )
    assert one.open_key != Finding(Kind.OBJECT_MISSING, "gone", ref_id="r", key="k").open_key


def test_contract_keys_include_the_collision_free_variant() -> None:
    assert CONTRACT_KEY_RE.match("images/exp-a/20261201/070747.tar")
    assert CONTRACT_KEY_RE.match(
        "videos/exp-a/20261201/070747-233f170c-23de-4ae2-b15b-dd1e1cb5afb3.tar"
    )
    assert not CONTRACT_KEY_RE.match("images/exp-a/20261201/notes.txt")
    assert not CONTRACT_KEY_RE.match("images/exp-a/070747.tar")


def test_check_evaluations_fail_per_partition_pass_where_closed_and_cover_the_rest() -> None:
    opened = [
        ("2026-12-01|prince", "object_missing", "alarm", 2),
        ("2026-12-01|prince", "stuck", "warning", 1),
        ("2026-11-30|prince", "not_archived", "warning", 3),
        (None, "object_without_event", "warning", 4),
        ("1999-01-01|nowhere", "object_missing", "alarm", 1),  # no such partition
    ]
    closed = [("2026-11-29|prince", "object_mismatch"), ("2026-12-01|prince", "stuck")]
    evaluations = check_evaluations(7, opened, closed, lambda p: p.startswith("2026"))
    by = {(e.asset_key, e.check_name, e.partition): e for e in evaluations}
    failing = by[(AssetKey("raw_export"), CHECK, "2026-12-01|prince")]
    assert not failing.passed and failing.severity == AssetCheckSeverity.ERROR
    assert failing.metadata["findings"].value == 3
    tape = by[(AssetKey("tape_archive"), CHECK, "2026-11-30|prince")]
    assert not tape.passed and tape.severity == AssetCheckSeverity.WARN
    assert by[(AssetKey("raw_export"), CHECK, "2026-11-29|prince")].passed
    unowned = by[(AssetKey("raw_export"), UNOWNED_CHECK, None)]
    assert not unowned.passed and unowned.metadata["findings"].value == 5
    assert len(evaluations) == 4
