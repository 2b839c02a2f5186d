"""The archive-notification contract (docs/contracts.md §4): real samples parse, every way a
message can be wrong gets a reason that names the field."""

from __future__ import annotations

import json
import uuid
from datetime import date

import pytest

from dlm_pipelines.archive_locations import (
    ARCHIVE_ID_NAMESPACE,
    InvalidArchiveMessage,
    archive_id,
    parse_archive_message,
)
from tests.conftest import FIXTURES, load_fixture

SAMPLE = load_fixture("archive_message.json")


def body(**changes: object) -> bytes:
    return json.dumps({**SAMPLE, **changes}, indent=4).encode()


def reason(raw: bytes) -> str:
    with pytest.raises(InvalidArchiveMessage) as caught:
        parse_archive_message(raw)
    return str(caught.value)


def test_sample_parses_as_sent() -> None:
    message = parse_archive_message((FIXTURES / "archive_message.json").read_bytes())
    assert message.job_id == "db26be9f-41d1-4890-a451-741160319b52"
    assert message.date == date(2026, 12, 1)
    (archive,) = message.archives
    assert (archive.path, archive.event_type, archive.experiment_id) == (
        "images/exp-a/20261130.tar",
        "stitch",
        "exp-a",
    )
    assert archive.src_keys == (
        "mycostreams-raw-data/images/exp-a/20261130/120000.tar",
        "mycostreams-raw-data/images/exp-a/20261130/120030.tar",
    )
    assert message.document == SAMPLE  # kept as sent for the job record


def test_naive_datetime_of_older_archivers_is_the_run_day() -> None:
    message = parse_archive_message((FIXTURES / "archive_message_naive_date.json").read_bytes())
    assert message.date == date(2026, 11, 27)
    assert message.archives[0].experiment_id == "exp-old"


def test_empty_run_parses_with_no_archives() -> None:
    message = parse_archive_message((FIXTURES / "archive_message_empty_run.json").read_bytes())
    assert message.archives == () and message.date == date(2026, 12, 1)


def test_archive_id_is_uuid5_of_the_path_and_stable() -> None:
    path = "images/exp-a/20261130.tar"
    assert archive_id(path) == str(uuid.uuid5(ARCHIVE_ID_NAMESPACE, path))
    # Pinned: ids are stored and served; changing the namespace would orphan them.
    assert archive_id(path) == "03ff5a72-8c88-5c04-b42b-2339f316ff29"
    assert archive_id(path) != archive_id("images/exp-a/20261201.tar")


@pytest.mark.parametrize(
    ("kind", "event_type"), [("images", "stitch"), ("videos", "video"), ("overview", "overview")]
)
def test_event_type_comes_from_the_first_path_segment(kind: str, event_type: str) -> None:
    archives = [{"path": f"{kind}/exp-1/20261130.tar", "src_keys": []}]
    assert parse_archive_message(body(archives=archives)).archives[0].event_type == event_type


def test_repeated_src_keys_are_one_member() -> None:
    key = SAMPLE["archives"][0]["src_keys"][0]
    archives = [{"path": "images/exp-a/20261130.tar", "src_keys": [key, key]}]
    assert parse_archive_message(body(archives=archives)).archives[0].src_keys == (key,)


def test_extra_fields_are_ignored() -> None:
    assert parse_archive_message(body(host="archiver-2")).job_id == SAMPLE["job_id"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"not json {", "body is not JSON"),
        (b"\xff\xfe{}", "body is not UTF-8"),
        (b"[1, 2]", "body must be a JSON object, got a list"),
        (b'{"job_id": "x"}', "missing field(s): date, archives"),
        (body(job_id=""), "job_id: ''"),
        (body(job_id=42), "job_id: 42"),
        (body(job_id="x" * 65), "at most 64"),
        (body(archives={"path": "a"}), "archives: must be a list, got an object"),
        (body(archives=["images/exp-a/20261130.tar"]), "archives[0]: must be an object"),
        (body(archives=[{"path": "images/exp-a/20261130.tar"}]), "missing field(s): src_keys"),
    ],
)
def test_wrong_shape_is_named(raw: bytes, expected: str) -> None:
    assert expected in reason(raw)


@pytest.mark.parametrize(
    "value",
    [
        "2026-13-01",
        "2026-02-30",
        "20261201",
        "2026-12-01T00:00:00+00:00",
        "2026-12-01T00:00:00Z",
        "yesterday",
        "",
        20261201,
        None,
    ],
)
def test_bad_date_is_rejected(value: object) -> None:
    assert reason(body(date=value)).startswith(f"date: {value!r}")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("images/exp-a/20261130", "is not <kind>/<experiment_id>/<YYYYMMDD>.tar"),
        ("images/exp-a/sub/20261130.tar", "is not <kind>/<experiment_id>/<YYYYMMDD>.tar"),
        ("/images/exp-a/20261130.tar", "is not <kind>/<experiment_id>/<YYYYMMDD>.tar"),
        ("tapes/exp-a/20261130.tar", "kind 'tapes' is not one of images, videos, overview"),
        ("images/..hidden/20261130.tar", "not a safe single path segment"),
        ("images/exp-a/20261332.tar", "'20261332' is not a real YYYYMMDD day"),
        (7, "archives[0].path: 7"),
    ],
)
def test_bad_path_is_rejected(path: object, expected: str) -> None:
    assert expected in reason(body(archives=[{"path": path, "src_keys": []}]))


@pytest.mark.parametrize("src_keys", ["a/b.tar", [""], [None], ["k" * 1025]])
def test_bad_src_keys_are_rejected(src_keys: object) -> None:
    archives = [{"path": "images/exp-a/20261130.tar", "src_keys": src_keys}]
    assert reason(body(archives=archives)).startswith("archives[0].src_keys")


def test_the_same_path_twice_in_one_message_is_rejected() -> None:
    archive = {"path": "images/exp-a/20261130.tar", "src_keys": []}
    assert "repeats archives[0]" in reason(body(archives=[archive, archive]))
