"""Intake that cannot be poisoned (issue 11, item 1): every input a lab has met that
used to stall the imaging sensor, through the real sensor, Redis and PostgreSQL.

Each entry must end catalogued, as a silent identical repeat, or dead-lettered with
every original byte, its source id and a reason; the cursor always moves past it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from dagster import AssetObservation

from dlm_pipelines.catalog import EventStatus
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.events import original_fields
from dlm_pipelines.intake import CONFLICT
from tests.integration.helpers import make_event, make_settings, run_sensor

pytestmark = pytest.mark.integration
TODAY = datetime.now(UTC).date().isoformat()
Pairs = list[tuple[bytes, bytes]]


@pytest.fixture
def dlm(catalog, object_store, streams, data_root):
    return build_definitions(make_settings(catalog, object_store, streams, data_root))


@pytest.fixture
def root(data_root) -> Path:
    return Path(data_root.path)


def pairs(fields: dict[str, str]) -> Pairs:
    return [(k.encode(), v.encode()) for k, v in fields.items()]


def xadd(streams, entry: Pairs) -> str:
    """XADD the pairs exactly (bytes, order, repeated names), as a producer could."""
    flat = [part for pair in entry for part in pair]
    return str(streams.client.execute_command("XADD", streams.imaging_event_stream, "*", *flat))


def dead_letters(streams) -> dict[str, tuple[str, Pairs]]:
    """source id → (reason, the producer's original pairs), read as raw text pairs."""
    client = redis.Redis.from_url(streams.url, decode_responses=True)  # text, as operators read
    client.set_response_callback("XRANGE", lambda response, **_: response)  # pairs, not a dict
    raw = client.xrange(streams.dead_letter_stream)
    out = {}
    for _, flat in raw:
        letter = list(zip(flat[::2], flat[1::2], strict=True))
        meta = {k: v for k, v in letter if k.startswith("dlm_") and ":" not in k}
        out[meta["dlm_source_id"]] = (meta["dlm_reason"], original_fields(letter))
    return out


def with_metadata(fields: dict[str, str], **camera: object) -> dict[str, str]:
    doc = json.loads(fields["metadata"])
    doc["camera"].update(camera)
    return {**fields, "metadata": json.dumps(doc)}


def replace(entry: Pairs, name: bytes, value: bytes) -> Pairs:
    return [(k, value if k == name else v) for k, v in entry]


def poison(root: Path) -> dict[str, Pairs]:
    """Every input issue 11 lists, and their relatives: name → raw entry."""

    def good() -> dict[str, str]:
        return make_event(root, write=False)

    nested = "[" * 100_000 + "]" * 100_000
    doc = json.loads(good()["metadata"])
    doc["camera"]["extra"] = json.loads("[" * 40 + "]" * 40)  # allowed by JSON, too deep
    return {
        "non-UTF-8 value (Latin-1 path)": replace(
            pairs(good()), b"local_path", b"Images/caf\xe9/na\xefve"
        ),
        "non-UTF-8 metadata": replace(pairs(good()), b"metadata", b'{"a": "\xff\xfe"}'),
        "non-UTF-8 ref_id": replace(pairs(good()), b"ref_id", b"\x80" * 36),
        "year 1 with an offset": replace(pairs(good()), b"timestamp", b"0001-01-01T00:30+01:00"),
        "year 9999 with an offset": replace(pairs(good()), b"timestamp", b"9999-12-31T23:30-01:00"),
        "far future": replace(
            pairs(good()),
            b"timestamp",
            (datetime.now(UTC) + timedelta(days=400)).isoformat().encode(),
        ),
        "before the first partition": replace(pairs(good()), b"timestamp", b"2020-01-01T00:00:00Z"),
        "img_count with thousands of digits": replace(pairs(good()), b"img_count", b"9" * 5000),
        "img_count above the column": replace(pairs(good()), b"img_count", b"2147483648"),
        "deeply nested metadata": replace(pairs(good()), b"metadata", nested.encode()),
        "nested metadata within JSON's limits": replace(
            pairs(good()), b"metadata", json.dumps(doc).encode()
        ),
        "NaN in metadata": pairs(with_metadata(good(), gain=float("nan"))),
        "Infinity in metadata": pairs(with_metadata(good(), gamma=float("inf"))),
        "-Infinity in metadata": pairs(with_metadata(good(), exposure_time=float("-inf"))),
        "a float that overflows": replace(
            pairs(good()),
            b"metadata",
            good()["metadata"].replace('"exposure_time":0.01', '"exposure_time":1e400').encode(),
        ),
        "a huge integer in metadata": replace(
            pairs(good()),
            b"metadata",
            good()["metadata"]
            .replace('"frame_size":[1,1]', '"frame_size":[1,' + "7" * 5000 + "]")
            .encode(),
        ),
        "NUL in a metadata string": pairs(
            {**good(), "metadata": good()["metadata"].replace("mock-user", "mock\\u0000user")}
        ),
        "lone surrogate in a metadata string": pairs(
            {**good(), "metadata": good()["metadata"].replace("mock-user", "mock\\ud800user")}
        ),
        "NUL in local_path": replace(pairs(good()), b"local_path", b"Images/a\x00b"),
        "repeated field": [*pairs(good()), (b"local_path", b"Images/other")],
        "huge local_path": replace(pairs(good()), b"local_path", b"a/" * 5000),
        "huge metadata": replace(pairs(good()), b"metadata", b" " * (2 * 1024 * 1024)),
        "no fields but one": [(b"x", b"")],
    }


def test_every_poison_is_dead_lettered_alone_and_the_rest_is_exported(
    dlm, dagster_instance, streams, catalog, root
) -> None:
    before = make_event(root)
    entries = poison(root)
    # unknown fields are ignored whatever their bytes (CONTRACTS §1)
    after_fields = make_event(root)
    after = [(b"", b""), *pairs(after_fields), (b"note\xff", b"\xfe"), (b"note\xff", b"")]
    first_id = xadd(streams, pairs(before))
    ids = {name: xadd(streams, entry) for name, entry in entries.items()}
    last_id = xadd(streams, after)

    result = run_sensor(dlm, dagster_instance)

    assert result.cursor == last_id  # nothing stalls the stream
    (request,) = result.run_requests
    assert request.partition_key == f"{TODAY}|prince"
    assert request.run_config["ops"]["raw_export"]["config"]["ref_ids"] == [
        before["ref_id"],
        after_fields["ref_id"],
    ]
    letters = dead_letters(streams)
    assert first_id not in letters and last_id not in letters
    for name, stream_id in ids.items():
        assert stream_id in letters, f"{name} was not dead-lettered"
        reason, original = letters[stream_id]
        assert original == entries[name], f"{name}: the dead letter lost bytes"
        assert reason and "could not be handled" not in reason, (name, reason)
    reasons = {name: letters[ids[name]][0] for name in ids}
    assert "not UTF-8" in reasons["non-UTF-8 value (Latin-1 path)"]
    assert "edge of the calendar" in reasons["year 1 with an offset"]
    assert "edge of the calendar" in reasons["year 9999 with an offset"]
    assert "outside the accepted window" in reasons["far future"]
    assert "outside the accepted window" in reasons["before the first partition"]
    assert "img_count" in reasons["img_count above the column"]
    assert "nested deeper" in reasons["deeply nested metadata"]
    assert "nested deeper" in reasons["nested metadata within JSON's limits"]
    assert "NaN is not a finite number" in reasons["NaN in metadata"]
    assert "Infinity is not a finite number" in reasons["Infinity in metadata"]
    assert "non-finite" in reasons["a float that overflows"]
    assert "appears more than once" in reasons["repeated field"]
    assert "NUL or a lone surrogate" in reasons["lone surrogate in a metadata string"]
    (observation,) = [e for e in result.asset_events if isinstance(e, AssetObservation)]
    assert observation.metadata["dead_lettered"].value == len(entries)
    assert {r.ref_id for r in catalog.get_many([before["ref_id"], after_fields["ref_id"]])} == {
        before["ref_id"],
        after_fields["ref_id"],
    }


def test_a_ref_id_with_other_content_is_a_counted_conflict(
    dlm, dagster_instance, streams, catalog, root
) -> None:
    original = make_event(root)
    xadd(streams, pairs(original))
    first = run_sensor(dlm, dagster_instance)
    # later: the identical entry again (silent), then the ref_id with another folder,
    # and within one batch, a new ref_id twice with different content
    twin = make_event(root)
    ids = [
        xadd(streams, pairs(original)),
        xadd(streams, pairs({**original, "local_path": "Images/elsewhere"})),
        xadd(streams, pairs(twin)),
        xadd(streams, pairs({**twin, "img_count": "7"})),
        xadd(streams, pairs(twin)),
    ]
    result = run_sensor(dlm, dagster_instance, cursor=first.cursor)
    assert result.cursor == ids[-1]
    letters = dead_letters(streams)
    assert sorted(letters) == sorted([ids[1], ids[3]])
    assert CONFLICT in letters[ids[1]][0] and "local_path" in letters[ids[1]][0]
    assert CONFLICT in letters[ids[3]][0] and "img_count" in letters[ids[3]][0]
    (observation,) = [e for e in result.asset_events if isinstance(e, AssetObservation)]
    assert observation.metadata["conflicts"].value == 2
    assert catalog.get(original["ref_id"]).local_path == original["local_path"]
    assert catalog.get(twin["ref_id"]).img_count == int(twin["img_count"])
    # the original waits for its first run still (never launched here), so it comes along
    (request,) = result.run_requests
    assert request.run_config["ops"]["raw_export"]["config"]["ref_ids"] == [
        original["ref_id"],
        twin["ref_id"],
    ]


def test_an_event_dated_in_the_future_is_reported_and_waits_for_its_day(
    dlm, dagster_instance, streams, catalog, root
) -> None:
    later = datetime.now(UTC) + timedelta(days=3)
    fields = make_event(root, timestamp=later)
    xadd(streams, pairs(fields))
    result = run_sensor(dlm, dagster_instance)
    assert result.run_requests == []
    record = catalog.get(fields["ref_id"])
    assert record.status == EventStatus.RECEIVED
    assert "in the future" in record.last_error and later.date().isoformat() in record.last_error


def test_a_row_the_database_refuses_is_dead_lettered_alone(
    dlm, dagster_instance, streams, catalog, root
) -> None:
    # Whatever else the database may refuse one day: here a constraint it enforces.
    with catalog.engine.begin() as conn:
        conn.execute(
            sa.text(
                "ALTER TABLE imaging_event ADD CONSTRAINT no_refused "
                "CHECK (experiment_id <> 'refused')"
            )
        )
    try:
        good = [make_event(root), make_event(root)]
        refused = make_event(root, experiment_id="refused")
        ids = [xadd(streams, pairs(f)) for f in (good[0], refused, good[1])]
        result = run_sensor(dlm, dagster_instance)
    finally:
        with catalog.engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE imaging_event DROP CONSTRAINT no_refused"))
    assert result.cursor == ids[-1]
    letters = dead_letters(streams)
    assert list(letters) == [ids[1]]
    assert "could not be handled: IntegrityError" in letters[ids[1]][0]
    assert {r.ref_id for r in catalog.get_many([f["ref_id"] for f in good])} == {
        f["ref_id"] for f in good
    }


def test_the_lost_entries_alarm_works_with_undecodable_entries_in_the_stream(
    dlm, dagster_instance, streams, root
) -> None:
    # XINFO STREAM returns the first and last entries: read undecoded, or the check fails.
    first = xadd(streams, replace(pairs(make_event(root)), b"local_path", b"caf\xe9"))
    tick = run_sensor(dlm, dagster_instance)
    lost = xadd(streams, pairs(make_event(root)))
    streams.client.xdel(streams.imaging_event_stream, lost)
    xadd(streams, [(b"x", b"\xff")])
    result = run_sensor(dlm, dagster_instance, cursor=tick.cursor)
    assert tick.cursor == first
    alarms = [e for e in result.asset_events if "alarm" in e.metadata]
    assert [a.metadata["max_deleted_entry_id"].value for a in alarms] == [lost]
