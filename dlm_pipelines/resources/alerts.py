"""The alert webhook (`DLM_ALERT_WEBHOOK_URL`) as a Dagster resource; see alerts.py."""

from __future__ import annotations

from dagster import ConfigurableResource

from dlm_pipelines.alerts import DEFAULT_TIMEOUT_SECONDS, Alert, post_alert


class Alerts(ConfigurableResource):
    webhook_url: str | None = None  # None: alerts are only logged
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

    def send(self, alert: Alert) -> bool:
        """One POST, never raising and never waiting longer than the timeout."""
        return post_alert(self.webhook_url, alert, self.timeout_seconds)
