"""Named API tokens: parsing DLM_API_TOKENS and the tokens file, and matching."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import TypeAdapter, ValidationError

from dlm_api import deps
from dlm_api.deps import TokenChecker, TokenConfigError, load_tokens
from dlm_api.schemas import UTCDatetime
from dlm_pipelines.settings import Settings


def test_tokens_come_from_the_variable_and_the_file(tmp_path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# lab scripts\n\ncarol : c-token \n  # old: x\n")
    settings = Settings(
        api_tokens=" alice:a-token, bob:b:token-with-colon ,", api_tokens_file=tokens_file
    )
    assert load_tokens(settings) == {
        "alice": "a-token",
        "bob": "b:token-with-colon",
        "carol": "c-token",
    }
    assert load_tokens(Settings(api_tokens=None, api_tokens_file=None)) == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("alice", "entry 1: expected 'name:token'"),
        ("alice:", "entry 1: expected 'name:token'"),
        ("a:x,:y", "entry 2: expected 'name:token'"),
        ("a:x,a:y", "'a' is given twice"),
        ("a:same,b:same", "also another name's"),
    ],
)
def test_malformed_tokens_are_refused_without_showing_them(raw: str, message: str) -> None:
    with pytest.raises(TokenConfigError, match=message) as error:
        load_tokens(Settings(api_tokens=raw, api_tokens_file=None))
    assert "same" not in str(error.value) and ":x" not in str(error.value)


def test_a_missing_tokens_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(TokenConfigError, match=r"DLM_API_TOKENS_FILE .*missing: No such file"):
        load_tokens(Settings(api_tokens=None, api_tokens_file=tmp_path / "missing"))


def test_every_token_is_compared_in_constant_time(monkeypatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    checker = TokenChecker({"alice": "a-token", "bob": "a-much-longer-token-for-bob"})
    assert checker.name_of("a-token") == "alice"
    assert checker.name_of("a-token ") is None
    assert checker.name_of("") is None
    # all tokens are compared on every call, as fixed-length digests (no length leak)
    assert len(calls) == 6
    assert {len(a) for a, _ in calls} == {len(b) for _, b in calls} == {32}


def test_query_datetimes_need_an_offset_and_become_utc() -> None:
    adapter = TypeAdapter(UTCDatetime)
    parsed = adapter.validate_python("2026-12-01T08:00:00+01:00")
    assert parsed == datetime(2026, 12, 1, 7, tzinfo=UTC) and parsed.tzinfo == UTC
    with pytest.raises(ValidationError, match="timezone"):
        adapter.validate_python("2026-12-01T08:00:00")
    with pytest.raises(ValidationError, match="out of range"):
        adapter.validate_python(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
