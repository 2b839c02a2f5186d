"""Alerts: one POST to a chat webhook when an operator must act.

The body is `{"text": ...}`, which Slack, Mattermost and Teams incoming webhooks
all show, plus the same facts as structured fields under `"dlm"` for anything
that parses them. A webhook that is down or slow never blocks the pipeline: one
attempt, a short timeout, and a failure is logged, not raised.

Each alert kind has one builder here; the Dagster wiring decides when to send.
Reconciliation (issue 14) calls `reconciliation_alarm` and sends the result.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 5.0
MAX_LISTED = 10  # events or reasons named in the text; the fields carry them all


@dataclass(frozen=True)
class Alert:
    kind: str  # export_run_failed, purge_run_failed, run_failed, dead_letters, reconciliation
    text: str  # what a person reads in the chat
    fields: Mapping[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"text": self.text, "dlm": {"alert": self.kind, **self.fields}}


def post_alert(
    webhook_url: str | None, alert: Alert, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> bool:
    """POST `alert` once; True if the webhook took it. Never raises."""
    if not webhook_url:
        return False
    request = urllib.request.Request(
        webhook_url,
        data=json.dumps(alert.body()).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
        return True
    except (urllib.error.URLError, OSError, ValueError) as exc:
        # The URL may hold the webhook's secret: name only the alert.
        log.warning("alert %s not delivered: %s", alert.kind, exc)
        return False


def _listed(items: Mapping[str, Any]) -> str:
    """`• key: value` lines, at most MAX_LISTED of them."""
    lines = [f"• {key}: {value}" for key, value in list(items.items())[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"• … and {len(items) - MAX_LISTED} more")
    return "\n".join(lines)


def export_run_failed(
    *, run_id: str, partition: str | None, failures: Mapping[str, str], reason: str, link: str
) -> Alert:
    """A raw_export run failed: which events, why, where to look."""
    where = f" for {partition}" if partition else ""
    head = f"DLM: export run {run_id[:8]}{where} failed"
    if failures:
        text = f"{head}: {len(failures)} event(s) not exported\n{_listed(failures)}\n{link}"
    else:
        text = f"{head}: {reason}\n{link}"
    return Alert(
        "export_run_failed",
        text,
        {
            "run_id": run_id,
            "partition": partition,
            "failures": dict(failures),
            "reason": reason,
            "link": link,
        },
    )


def purge_run_failed(*, run_id: str, alarms: Mapping[str, str], reason: str, link: str) -> Alert:
    """A purge run failed; `alarms` are events whose S3 object does not match the catalog."""
    if alarms:
        text = (
            f"DLM: purge ALARM, {len(alarms)} event(s) whose S3 object does not match the "
            f"catalog (local data kept)\n{_listed(alarms)}\n{link}"
        )
    else:
        text = f"DLM: purge run {run_id[:8]} failed: {reason}\n{link}"
    return Alert(
        "purge_run_failed",
        text,
        {"run_id": run_id, "alarms": dict(alarms), "reason": reason, "link": link},
    )


def run_failed(*, run_id: str, job: str, reason: str, link: str) -> Alert:
    """Any other failed run of the code location."""
    return Alert(
        "run_failed",
        f"DLM: {job} run {run_id[:8]} failed: {reason}\n{link}",
        {"run_id": run_id, "job": job, "reason": reason, "link": link},
    )


def dead_letters(*, source: str, destination: str, reasons: list[str]) -> Alert:
    """Entries rejected in one sensor tick: one alert with the count, never one per entry."""
    distinct: dict[str, int] = {}
    for reason in reasons:
        distinct[reason] = distinct.get(reason, 0) + 1
    listed = _listed({reason: f"{n} message(s)" for reason, n in distinct.items()})
    return Alert(
        "dead_letters",
        f"DLM: {len(reasons)} message(s) from {source} could not be read and were "
        f"dead-lettered to {destination}\n{listed}",
        {
            "source": source,
            "destination": destination,
            "count": len(reasons),
            "reasons": distinct,
        },
    )


def reconciliation_alarm(
    *, summary: str, details: Mapping[str, str], link: str | None = None
) -> Alert:
    """Reconciliation found the catalog and the store (or the archive) disagree.

    `details` maps what disagrees (a ref_id, a key) to how; `summary` says what was
    checked. For reconciliation (issue 14): `Alerts.send(reconciliation_alarm(...))`.
    """
    text = f"DLM: reconciliation alarm: {summary}\n{_listed(details)}"
    return Alert(
        "reconciliation",
        text + (f"\n{link}" if link else ""),
        {"summary": summary, "details": dict(details), "link": link},
    )
