"""What the DLM asks the Dagster instance about runs: which are alive, which wait.

Shared by the export asset, the imaging sensor and the purge, so that "alive" means
the same everywhere. Only the public `DagsterInstance` API.
"""

import math
import time

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

# On an export run that the sensor started: "true" while the run takes every new
# event of its partition (so the sensor requests no other run), "false" once it stopped
# taking them. Set on the run request, turned off by the run itself.
ACCEPTING_TAG = "dlm/accepting"
PARTITION_TAG = "dagster/partition"  # on every partitioned run, a multi-partition's whole key

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


# A sensor may act on an answer of `partitions_taking_new_events` this old; a run that
# stops accepting keeps polling for STOP_GRACE_SECONDS, so an event recorded on an
# answer given just before the stop is still taken (the margin: the record's commit).
TAKING_ANSWER_MAX_AGE = 1.0
STOP_GRACE_SECONDS = 2.0


def partitions_taking_new_events(instance: DagsterInstance) -> set[str]:
    """The partitions with a run that will export the events recorded now: one that has
    not started (it takes every pending event when it does), or one that accepts. One
    query, whatever the number of partitions."""
    records = instance.get_run_records(
        filters=RunsFilter(statuses=[*WAITING_RUN_STATUSES, *RUNNING_STATUSES])
    )
    return {
        r.dagster_run.tags[PARTITION_TAG]
        for r in records
        if PARTITION_TAG in r.dagster_run.tags
        and (
            r.dagster_run.status in WAITING_RUN_STATUSES
            or r.dagster_run.tags.get(ACCEPTING_TAG) == "true"
        )
    }


class TakingNewEvents:
    """`partitions_taking_new_events`, asked again once the answer is older than
    TAKING_ANSWER_MAX_AGE: a tick's intake rounds share one query a second."""

    def __init__(self, instance: DagsterInstance) -> None:
        self.instance = instance
        self.asked_at = -math.inf
        self.partitions: set[str] = set()

    def __contains__(self, partition_key: object) -> bool:
        now = time.monotonic()
        if now - self.asked_at > TAKING_ANSWER_MAX_AGE:
            self.asked_at = now  # before the query: the answer is at least this fresh
            self.partitions = partitions_taking_new_events(self.instance)
        return partition_key in self.partitions


def stop_accepting(instance: DagsterInstance, run_id: str) -> None:
    instance.add_run_tags(run_id, {ACCEPTING_TAG: "false"})
