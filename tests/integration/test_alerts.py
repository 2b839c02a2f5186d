"""Alerts reach a webhook once each: a local HTTP receiver stands in for Slack."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dagster import build_sensor_context

from dlm_pipelines.alerts import Alert, post_alert, reconciliation_alarm
from dlm_pipelines.definitions import build_definitions
from tests.integration.helpers import (
    make_event,
    make_settings,
    materialize_requests,
    run_sensor,
)
from tests.integration.test_archive import archive_queue  # noqa: F401 - a fixture
from tests.integration.test_archive import definitions as archive_definitions
from tests.integration.test_archive import publish as publish_archive
from tests.integration.test_archive import tick as archive_tick

pytestmark = pytest.mark.integration
TODAY = datetime.now(UTC).date().isoformat()


class Receiver:
    """An HTTP server keeping every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0/B0/secret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def of_kind(self, kind: str) -> list[dict]:
        return [b for b in self.bodies if b["dlm"]["alert"] == kind]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture
def root(data_root) -> Path:
    return Path(data_root.path)


@pytest.fixture
def dlm(catalog, object_store, streams, data_root, receiver):
    settings = make_settings(
        catalog,
        object_store,
        streams,
        data_root,
        alert_webhook_url=receiver.url,
        export_max_retries=0,
        dagster_ui_url="http://dagster.lab.example",
    )
    return build_definitions(settings)


def publish(streams, *events: dict[str, str]) -> list[str]:
    return [streams.client.xadd(streams.imaging_event_stream, fields) for fields in events]


def tick_alert_sensor(defs, instance, cursor: str | None) -> str | None:
    sensor = defs.resolve_sensor_def("alert_on_failed_runs")
    with build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources) as ctx:
        return sensor.evaluate_tick(ctx).cursor


def test_dead_letters_are_one_alert_per_tick(dlm, dagster_instance, streams, root, receiver):
    good = make_event(root)
    bad = [
        {**make_event(root), "timestamp": "2026-12-01T07:07:47"},
        {**make_event(root), "local_path": "../tsu-exp002/secret"},
        {**make_event(root), "system": "unknown-scope"},
    ]
    publish(streams, bad[0], good, *bad[1:])
    result = run_sensor(dlm, dagster_instance)
    (alert,) = receiver.bodies
    assert alert["dlm"]["alert"] == "dead_letters"
    assert alert["dlm"]["count"] == 3
    assert alert["dlm"]["source"] == streams.imaging_event_stream
    assert alert["dlm"]["destination"] == streams.dead_letter_stream
    assert alert["text"].startswith(f"DLM: 3 message(s) from {streams.imaging_event_stream}")
    assert "naive" in alert["text"] and "'..'" in alert["text"]
    # the next tick reads nothing new: no second alert
    run_sensor(dlm, dagster_instance, cursor=result.cursor)
    publish(streams, make_event(root))
    run_sensor(dlm, dagster_instance, cursor=result.cursor)
    assert len(receiver.bodies) == 1


def test_a_failed_export_run_is_announced_once(dlm, dagster_instance, streams, root, receiver):
    cursor = tick_alert_sensor(dlm, dagster_instance, None)  # starts from now
    missing = make_event(root, write=False)
    publish(streams, make_event(root), missing)
    (outcome,) = materialize_requests(dlm, dagster_instance, run_sensor(dlm, dagster_instance))
    assert not outcome.success
    cursor = tick_alert_sensor(dlm, dagster_instance, cursor)
    tick_alert_sensor(dlm, dagster_instance, cursor)  # the same failure is not told twice
    (alert,) = receiver.of_kind("export_run_failed")
    run_id = outcome.run_id
    fields = alert["dlm"]
    assert fields["run_id"] == run_id
    assert fields["partition"] == f"{TODAY}|prince"
    assert set(fields["failures"]) == {missing["ref_id"]}
    assert "does not exist" in fields["failures"][missing["ref_id"]]
    assert fields["link"] == f"http://dagster.lab.example/runs/{run_id}"
    assert missing["ref_id"] in alert["text"] and fields["link"] in alert["text"]
    assert alert["text"].startswith(f"DLM: export run {run_id[:8]} for {TODAY}|prince failed")


def test_a_purge_alarm_is_announced_once(
    catalog, object_store, streams, data_root, dagster_instance, root, receiver
) -> None:
    settings = make_settings(
        catalog,
        object_store,
        streams,
        data_root,
        alert_webhook_url=receiver.url,
        purge_systems=["prince"],
        purge_lifespan=1,
        purge_min_free=0,
    )
    dlm = build_definitions(settings)
    cursor = tick_alert_sensor(dlm, dagster_instance, None)
    tampered, healthy = make_event(root), make_event(root)
    publish(streams, tampered, healthy)
    assert all(
        o.success
        for o in materialize_requests(dlm, dagster_instance, run_sensor(dlm, dagster_instance))
    )
    record = catalog.get(tampered["ref_id"])
    object_store.client.put_object(
        Bucket=object_store.bucket,
        Key=record.object_key,
        Body=os.urandom(record.size),  # other bytes, same size: only the sha256 tells
        Metadata={"ref-id": record.ref_id},
    )
    time.sleep(1.2)  # past the lifespan
    purge = dlm.resolve_job_def("purge").execute_in_process(
        instance=dagster_instance, raise_on_error=False
    )
    assert not purge.success
    cursor = tick_alert_sensor(dlm, dagster_instance, cursor)
    tick_alert_sensor(dlm, dagster_instance, cursor)
    (alert,) = receiver.bodies
    assert alert["dlm"]["alert"] == "purge_run_failed"
    assert set(alert["dlm"]["alarms"]) == {tampered["ref_id"]}
    assert "sha256" in alert["dlm"]["alarms"][tampered["ref_id"]]
    assert alert["text"].startswith("DLM: purge ALARM, 1 event(s) whose S3 object does not match")
    assert alert["dlm"]["link"].endswith(f"/runs/{purge.run_id}")


def test_archive_dead_letters_are_one_alert_per_tick(
    catalog,
    archive_queue,  # noqa: F811 - the fixture imported from test_archive
    dagster_instance,
    receiver,
) -> None:
    defs = archive_definitions(catalog, archive_queue, alert_webhook_url=receiver.url)
    bad = [b"not json {", b'["a list"]', b"also not json"]
    publish_archive(archive_queue.url or "", bad, queue=archive_queue.queue)
    archive_tick(defs, dagster_instance)
    archive_tick(defs, dagster_instance)  # nothing new: no second alert
    (alert,) = receiver.bodies
    assert alert["dlm"]["alert"] == "dead_letters" and alert["dlm"]["count"] == 3
    assert alert["dlm"]["source"] == archive_queue.queue
    assert alert["dlm"]["destination"] == archive_queue.dead_letter_queue
    assert "body is not JSON" in alert["text"]


def test_a_webhook_that_is_down_or_hangs_never_blocks(receiver) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    alert = Alert("test", "hello")
    assert post_alert(closed, alert) is False

    hanging = socket.socket()  # accepts the connection, never answers
    hanging.bind(("127.0.0.1", 0))
    hanging.listen()
    try:
        started = time.monotonic()
        url = f"http://127.0.0.1:{hanging.getsockname()[1]}/hook"
        assert post_alert(url, alert, timeout=1.0) is False
        assert time.monotonic() - started < 5
    finally:
        hanging.close()
    assert post_alert(None, alert) is False  # no webhook configured: nothing to do
    assert receiver.bodies == []


def test_reconciliation_can_send_its_alarm(receiver) -> None:
    alarm = reconciliation_alarm(
        summary="2 exports missing from the store",
        details={"ref-1": "no object at images/x/20261201/010203.tar", "ref-2": "size 3 != 4"},
    )
    assert post_alert(receiver.url, alarm) is True
    (body,) = receiver.bodies
    assert body["dlm"]["alert"] == "reconciliation"
    assert body["text"].startswith("DLM: reconciliation alarm: 2 exports missing")
    assert body["dlm"]["details"]["ref-2"] == "size 3 != 4"
