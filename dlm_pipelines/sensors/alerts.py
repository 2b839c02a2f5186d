"""`alert_on_failed_runs`: one alert per failed run of this code location.

Dagster's run-failure sensor keeps a cursor over the failure events, so each
failed run is announced once, whichever process died. Export runs name their
failed events and reasons (the step's Failure metadata), purge runs their alarms;
a run failed for silence (no heartbeat) has only the run's failure message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import (
    DefaultSensorStatus,
    MetadataValue,
    RunFailureSensorContext,
    SensorDefinition,
    run_failure_sensor,
)

from dlm_pipelines import alerts
from dlm_pipelines.resources.alerts import Alerts
from dlm_pipelines.settings import Settings

PURGE_JOB = "purge"
PARTITION_TAG = "dagster/partition"


def _failure_metadata(context: RunFailureSensorContext, key: str) -> dict[str, str]:
    """The JSON metadata `key` of the run's failed steps (raw_export: failures, purge: alarms)."""
    found: dict[str, str] = {}
    for event in context.get_step_failure_events():
        data = event.step_failure_data
        user = data.user_failure_data if data else None
        value: Any = user.metadata.get(key) if user else None
        if isinstance(value, MetadataValue):
            value = value.value
        if isinstance(value, Mapping):
            found.update({str(k): str(v) for k, v in value.items()})
    return found


def _reason(context: RunFailureSensorContext) -> str:
    for event in context.get_step_failure_events():
        data = event.step_failure_data
        if data and data.user_failure_data and data.user_failure_data.description:
            return data.user_failure_data.description
        if data and data.error:
            return data.error.message.strip()
    return context.failure_event.message or "no reason recorded"


def build_alert_sensor(settings: Settings) -> SensorDefinition:
    ui_url = settings.dagster_ui_url.rstrip("/")

    @run_failure_sensor(
        name="alert_on_failed_runs",
        description="Posts one alert to DLM_ALERT_WEBHOOK_URL per failed export, purge or "
        "other run: which events, why, and a link to the run.",
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
    )
    def alert_on_failed_runs(context: RunFailureSensorContext, alert_webhook: Alerts) -> None:
        run = context.dagster_run
        link = f"{ui_url}/runs/{run.run_id}"
        reason = _reason(context)
        if run.job_name == PURGE_JOB:
            alert = alerts.purge_run_failed(
                run_id=run.run_id,
                alarms=_failure_metadata(context, "alarms"),
                reason=reason,
                link=link,
            )
        elif PARTITION_TAG in run.tags:
            alert = alerts.export_run_failed(
                run_id=run.run_id,
                partition=run.tags[PARTITION_TAG],
                failures=_failure_metadata(context, "failures"),
                reason=reason,
                link=link,
            )
        else:
            alert = alerts.run_failed(run_id=run.run_id, job=run.job_name, reason=reason, link=link)
        sent = alert_webhook.send(alert)
        context.log.info(
            f"{alert.kind} alert for run {run.run_id}: {'sent' if sent else 'not sent'}"
        )

    return alert_on_failed_runs
