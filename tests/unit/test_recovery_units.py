"""Dead letters keep every byte; the retry backoff doubles up to its cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dlm_pipelines.events import dead_letter_fields, original_fields
from dlm_pipelines.recovery import RetrySchedule


@given(st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=40)), max_size=8))
def test_dead_letter_fields_are_text_and_lossless(pairs: list[tuple[bytes, bytes]]) -> None:
    letter = dead_letter_fields(pairs)
    for name, value in letter:
        assert isinstance(name, str) and isinstance(value, str)
        assert not name.startswith("dlm_") or ":" in name  # never one of DLM's own fields
    assert original_fields(letter) == pairs


def test_readable_fields_stay_readable() -> None:
    letter = dead_letter_fields([(b"local_path", b"Images/caf\xe9"), (b"ref_id", b"abc")])
    assert letter == [("dlm_base64_value:local_path", "SW1hZ2VzL2NhZuk="), ("ref_id", "abc")]


def test_backoff_doubles_up_to_the_cap() -> None:
    schedule = RetrySchedule(backoff_seconds=60, max_backoff_seconds=3600, max_runs=10)
    assert [schedule.delay(n) for n in range(1, 10)] == [
        60,
        120,
        240,
        480,
        960,
        1920,
        3600,
        3600,
        3600,
    ]
    assert sum(schedule.delay(n) for n in range(1, 10)) > 3600  # outlasts an hour's outage
    assert schedule.delay(10_000) == 3600
