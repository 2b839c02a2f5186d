"""What the DLM asks the Dagster instance about runs: which are alive, which wait.

Shared by the export asset, the imaging sensor and the purge, so that "alive" means
the same everywhere. Only the public `DagsterInstance` API.
"""

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

# Not started yet: such a run takes every pending event of its partition when it starts.
WAITING_RUN_STATUSES = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED]
RUNNING_STATUSES = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]
# A run that is in one of these states may still be working on what it claimed.
LIVE_RUN_STATUSES = {*WAITING_RUN_STATUSES, *RUNNING_STATUSES, DagsterRunStatus.CANCELING}


def run_is_alive(instance: DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and run.status in LIVE_RUN_STATUSES


def alive_runs(instance: DagsterInstance, run_ids: set[str]) -> set[str]:
    """Those of `run_ids` that are alive (as `run_is_alive` says), in one query."""
    if not run_ids:
        return set()
    records = instance.get_run_records(
        filters=RunsFilter(run_ids=sorted(run_ids), statuses=list(LIVE_RUN_STATUSES))
    )
    return {record.dagster_run.run_id for record in records}


def partition_has_run(
    instance: DagsterInstance, partition_key: str, statuses: list[DagsterRunStatus]
) -> bool:
    """Whether a run of `partition_key` is in one of `statuses` now."""
    runs = instance.get_run_records(
        filters=RunsFilter(statuses=statuses, tags={"dagster/partition": partition_key}), limit=1
    )
    return bool(runs)
