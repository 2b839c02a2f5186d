"""What the DLM asks a real Dagster instance about runs: one answer for one run or many,
and which partitions a run will take new events of."""

from __future__ import annotations

import time

import pytest
from dagster import DagsterRunStatus, Definitions, asset, define_asset_job

from dlm_pipelines.dagster_runs import (
    ACCEPTING_TAG,
    LIVE_RUN_STATUSES,
    PARTITION_TAG,
    TAKING_ANSWER_MAX_AGE,
    TakingNewEvents,
    alive_runs,
    partitions_taking_new_events,
    run_is_alive,
    stop_accepting,
)

pytestmark = pytest.mark.integration


@asset
def tiny() -> int:
    return 1


def test_alive_runs_agrees_with_run_is_alive_in_one_query(dagster_instance) -> None:
    job = Definitions(assets=[tiny], jobs=[define_asset_job("tiny_job")]).resolve_job_def(
        "tiny_job"
    )
    runs = {  # a QUEUED run needs a code location's origin: NOT_STARTED stands for waiting
        status: dagster_instance.create_run_for_job(job_def=job, status=status).run_id
        for status in DagsterRunStatus
        if status != DagsterRunStatus.QUEUED
    }
    every = set(runs.values()) | {"no-such-run"}
    queries: list[object] = []
    get_run_records = dagster_instance.get_run_records

    def counted(*args, **kwargs):
        queries.append(kwargs.get("filters"))
        return get_run_records(*args, **kwargs)

    dagster_instance.get_run_records = counted
    try:
        alive = alive_runs(dagster_instance, every)
    finally:
        dagster_instance.get_run_records = get_run_records
    assert len(queries) == 1
    assert alive == {runs[status] for status in LIVE_RUN_STATUSES if status in runs}
    assert len(alive) == len(LIVE_RUN_STATUSES) - 1
    assert alive == {run_id for run_id in every if run_is_alive(dagster_instance, run_id)}
    assert alive_runs(dagster_instance, set()) == set()


def test_partitions_taking_new_events_are_waiting_or_accepting_runs(dagster_instance) -> None:
    job = Definitions(assets=[tiny], jobs=[define_asset_job("tiny_job")]).resolve_job_def(
        "tiny_job"
    )

    def run(partition: str, status: DagsterRunStatus, accepting: str | None = None) -> str:
        tags = {PARTITION_TAG: partition, **({ACCEPTING_TAG: accepting} if accepting else {})}
        return dagster_instance.create_run_for_job(job_def=job, status=status, tags=tags).run_id

    run("waiting", DagsterRunStatus.NOT_STARTED)
    run("warm", DagsterRunStatus.STARTED, accepting="true")
    stopped = run("stopped", DagsterRunStatus.STARTED, accepting="false")
    run("plain", DagsterRunStatus.STARTED)  # a backfill or UI run: takes only its own
    run("done", DagsterRunStatus.SUCCESS, accepting="true")
    dagster_instance.create_run_for_job(job_def=job, status=DagsterRunStatus.STARTED)

    assert partitions_taking_new_events(dagster_instance) == {"waiting", "warm"}

    # The sensor's view asks once a second at most, and sees a stop after that.
    taking = TakingNewEvents(dagster_instance)
    warm = run("later", DagsterRunStatus.STARTED, accepting="true")
    assert "later" in taking and "stopped" not in taking
    stop_accepting(dagster_instance, warm)
    assert "later" in taking  # an answer less than TAKING_ANSWER_MAX_AGE old
    time.sleep(TAKING_ANSWER_MAX_AGE + 0.1)
    assert "later" not in taking
    assert dagster_instance.get_run_by_id(stopped).tags[ACCEPTING_TAG] == "false"
