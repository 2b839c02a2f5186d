"""What the DLM asks a real Dagster instance about runs: one answer for one run or many."""

from __future__ import annotations

import pytest
from dagster import DagsterRunStatus, Definitions, asset, define_asset_job

from dlm_pipelines.dagster_runs import LIVE_RUN_STATUSES, alive_runs, run_is_alive

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
