"""A real browser (Debian's Chromium, driven by Playwright) against the running stack:
the Dagster UI shows raw_export's materialised partitions, and the API's /docs render.
Screenshots go to build/screenshots/ (or $DLM_SCREENSHOT_DIR)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_stack import publish, verified, wait_for
from tests.integration.helpers import make_event

pytestmark = pytest.mark.e2e
SCREENSHOTS = Path(
    os.environ.get("DLM_SCREENSHOT_DIR", Path(__file__).parents[2] / "build" / "screenshots")
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page() -> Iterator:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def test_dagster_ui_shows_materialised_partitions(stack, page) -> None:
    import redis

    from dlm_pipelines.catalog import Catalog

    catalog = Catalog(database_url=stack.database_url)
    streams = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    events = [make_event(stack.data_root, experiment_id="e2e-ui") for _ in range(2)]
    publish(stack, streams, events)
    wait_for("export", lambda: verified(catalog, events), 300, stack)

    def partition_counts() -> dict[str, int]:
        """The counts the partitions view shows, e.g. "Materialized (3)", "Missing (6)"."""
        page.goto(f"{stack.ui_url}/assets/raw_export?view=partitions")
        counts = {}
        for state in ("Materialized", "Missing"):
            label = page.get_by_text(re.compile(rf"^{state} \(\d[\d,]*\)$")).first
            label.wait_for()
            counts[state] = int(re.sub(r"\D", "", label.inner_text()))
        return counts

    # Days that ended hold no missing work: empty_partition_sensor closed their quiet
    # partitions. What may still read as missing: yesterday within its grace hour,
    # today and tomorrow (end_offset=1), for each system, less today's exported one.
    systems = len(stack.settings.systems)

    def settled() -> dict[str, int] | None:
        counts = partition_counts()
        return counts if counts["Missing"] <= 3 * systems else None

    counts = wait_for("only open days missing in the UI", settled, 180)
    assert counts["Materialized"] >= 29 * systems  # the month's ended days, all closed
    skip = page.get_by_role("button", name="Skip")  # Dagster's first-visit newsletter dialog
    if skip.count():
        skip.first.click()
    page.screenshot(path=str(SCREENSHOTS / "dagster-raw-export-partitions.png"), full_page=True)
    assert "raw_export" in page.inner_text("body")


def test_api_docs_render(stack, page) -> None:
    page.goto(f"{stack.api_url}/docs")
    page.get_by_text("/api/1/exports").first.wait_for()
    page.screenshot(path=str(SCREENSHOTS / "api-docs.png"), full_page=True)
    body = page.inner_text("body")
    assert "/api/1/events/{ref_id}/download" in body and "/health" in body
