"""The purge decision (pure): who is eligible, why the others are skipped, disk pressure."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from dlm_pipelines.catalog import EventRecord, EventStatus
from dlm_pipelines.purge_policy import (
    ALREADY_PURGED,
    NEEDS_ATTENTION,
    NO_OBJECT,
    NOT_OPTED_IN,
    NOT_VERIFIED,
    DiskLevel,
    PurgePolicy,
    plan_purge,
    take_for_pressure,
)
from dlm_pipelines.settings import Settings

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
POLICY = PurgePolicy(
    systems=frozenset({"prince"}), lifespan=timedelta(hours=8), min_free_percent=10
)
ROOMY = DiskLevel(total=1000, free=500)


def record(
    age: timedelta = timedelta(hours=9),
    *,
    system: str = "prince",
    status: str = EventStatus.VERIFIED,
    size: int | None = 100,
    **extra: object,
) -> EventRecord:
    received = NOW - age
    values: dict[str, object] = {
        "ref_id": str(uuid.uuid4()),
        "stream_id": "1-0",
        "system": system,
        "experiment_id": "exp-a",
        "event_type": "stitch",
        "timestamp": received - timedelta(minutes=1),
        "partition_key": f"{received.date().isoformat()}|{system}",
        "local_path": "Images/x",
        "img_count": 1,
        "event_metadata": {},
        "received_at": received,
        "status": status,
        "bucket": "b",
        "object_key": f"images/exp-a/{uuid.uuid4().hex}.tar",
        "size": size,
        "sha256": "0" * 64,
    }
    values.update(extra)
    return EventRecord(**values)


def reasons(plan) -> dict[str, str]:
    return {r.ref_id: skip.reason for r, skip in plan.skipped}


def test_settings_give_the_policy() -> None:
    settings = Settings(purge_systems="prince,tsu-exp002", purge_lifespan="PT2H", purge_min_free=5)
    policy = PurgePolicy.from_settings(settings)
    assert policy == PurgePolicy(frozenset({"prince", "tsu-exp002"}), timedelta(hours=2), 5.0)
    assert Settings(purge_lifespan="90").purge_lifespan == timedelta(seconds=90)


def test_defaults_delete_nothing() -> None:
    settings = Settings()
    assert settings.purge_systems == [] and settings.purge_lifespan == timedelta(hours=8)
    assert (settings.purge_cron, settings.purge_timezone) == ("0 */2 * * *", "Europe/Amsterdam")
    plan = plan_purge([record()], PurgePolicy.from_settings(settings), NOW, DiskLevel(100, 0))
    assert plan.due == [] and plan.early == []
    assert list(reasons(plan).values()) == [NOT_OPTED_IN]


def test_only_verified_events_of_opted_in_systems_whose_lifespan_passed_are_due() -> None:
    due = record()
    at_the_second = record(timedelta(hours=8))
    young = record(timedelta(hours=7, minutes=59))
    skipped = [
        (record(system="tsu-exp002"), NOT_OPTED_IN),
        (record(status=EventStatus.RECEIVED), NOT_VERIFIED),
        (record(status=EventStatus.FAILED), NOT_VERIFIED),
        (record(status=EventStatus.EXPORTING), NOT_VERIFIED),
        (record(status=EventStatus.NEEDS_ATTENTION), NEEDS_ATTENTION),
        (record(purged_at=NOW - timedelta(hours=1)), ALREADY_PURGED),
        (record(size=None), NO_OBJECT),
        (record(sha256=None), NO_OBJECT),
    ]
    plan = plan_purge([young, *(r for r, _ in skipped), due, at_the_second], POLICY, NOW, ROOMY)
    assert plan.due == [due, at_the_second]  # oldest first
    assert plan.early == [young]
    assert reasons(plan) == {r.ref_id: reason for r, reason in skipped}
    assert plan.bytes_short == 0


def test_a_stale_purge_claim_is_eligible_again() -> None:
    held = record(status=EventStatus.PURGING, run_id="dead-run")
    assert plan_purge([held], POLICY, NOW, ROOMY).due == [held]


def test_clock_behind_the_receipt_makes_nothing_due() -> None:
    plan = plan_purge([record(-timedelta(hours=1))], POLICY, NOW, ROOMY)
    assert plan.due == [] and len(plan.early) == 1


@pytest.mark.parametrize(
    ("total", "free", "percent", "short"),
    [
        (1000, 500, 10, 0),
        (1000, 100, 10, 0),  # exactly at the threshold
        (1000, 99, 10, 1),
        (1000, 0, 100, 1000),
        (1000, 0, 0, 0),  # 0 % turns disk pressure off
        (1001, 0, 10, 101),  # rounds up: never short of the threshold
        (0, 0, 10, 0),
    ],
)
def test_bytes_short(total: int, free: int, percent: float, short: int) -> None:
    assert DiskLevel(total, free).bytes_short(percent) == short


def test_disk_pressure_takes_the_oldest_young_events_until_the_shortfall_is_covered() -> None:
    young = [record(timedelta(hours=h), size=100) for h in (1, 5, 3, 7)]
    plan = plan_purge(young, POLICY, NOW, DiskLevel(total=10_000, free=750))
    assert plan.bytes_short == 250
    assert [r.received_at for r in plan.early] == sorted(r.received_at for r in young)
    taken = take_for_pressure(plan.early, plan.bytes_short)
    assert taken == plan.early[:3]  # 300 bytes of tars cover 250; a fourth is not needed
    assert take_for_pressure(plan.early, 0) == []
    assert take_for_pressure(plan.early, 10**9) == plan.early


def test_disk_pressure_never_takes_unverified_or_unopted_events() -> None:
    plan = plan_purge(
        [record(timedelta(hours=1), status=EventStatus.FAILED), record(system="tsu-exp003")],
        POLICY,
        NOW,
        DiskLevel(total=1000, free=0),
    )
    assert plan.due == [] and plan.early == [] and plan.bytes_short == 100


def test_the_schedule_runs_the_purge_job_by_default_on_the_configured_cron() -> None:
    from dagster import DefaultScheduleStatus

    from dlm_pipelines.definitions import build_definitions

    defs = build_definitions(Settings(purge_cron="*/30 6-18 * * 1-5", purge_timezone="UTC"))
    schedule = defs.resolve_schedule_def("purge_schedule")
    assert schedule.default_status == DefaultScheduleStatus.RUNNING
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("*/30 6-18 * * 1-5", "UTC")
    assert schedule.job_name == "purge"
    default = build_definitions(Settings()).resolve_schedule_def("purge_schedule")
    assert (default.cron_schedule, default.execution_timezone) == (
        "0 */2 * * *",
        "Europe/Amsterdam",
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"purge_systems": "prince,nope"}, "DLM_PURGE_SYSTEMS names nope"),
        ({"purge_timezone": "Mars/Olympus"}, "not an IANA time zone"),
        ({"purge_lifespan": "0"}, "greater than 0"),
        ({"purge_lifespan": "8 hours"}, "timedelta"),
        ({"purge_min_free": 101}, "less than or equal to 100"),
    ],
)
def test_bad_purge_settings_are_refused_with_a_clear_reason(values, message) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**values)
