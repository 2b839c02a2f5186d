"""What the DLM asks the Dagster instance about runs: which are alive, which wait.

Shared by the export asset, the imaging sensor and the purge, so that "alive" means
the same everywhere. Only the public `DagsterInstance` API.
"""

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

# On an export run that the sensor started: "true" while the run takes every new
# event of its partition (so the sensor requests no other run), "false" once it stopped
# taking them. Set on the run request, turned off by the run itself.
ACCEPTING_TAG = "dlm/accepting"

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


def partition_will_take_new_events(instance: DagsterInstance, partition_key: str) -> bool:
    """Whether a run of `partition_key` will export the events recorded now: one that
    has not started (it takes every pending event when it does), or one that accepts."""
    records = instance.get_run_records(
        filters=RunsFilter(
            statuses=[*WAITING_RUN_STATUSES, *RUNNING_STATUSES],
            tags={"dagster/partition": partition_key},
        )
    )
    return any(
        r.dagster_run.status in WAITING_RUN_STATUSES
        or r.dagster_run.tags.get(ACCEPTING_TAG) == "true"
        for r in records
    )


def stop_accepting(instance: DagsterInstance, run_id: str) -> None:
    instance.add_run_tags(run_id, {ACCEPTING_TAG: "false"})
