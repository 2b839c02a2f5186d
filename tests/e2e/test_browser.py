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

    def materialized_partitions() -> int:
        """The count the partitions view shows, e.g. "Materialized (3)"."""
        page.goto(f"{stack.ui_url}/assets/raw_export?view=partitions")
        label = page.get_by_text(re.compile(r"^Materialized \(\d[\d,]*\)$")).first
        label.wait_for()
        return int(re.sub(r"\D", "", label.inner_text()))

    assert wait_for("a materialised partition in the UI", materialized_partitions, 120) >= 1
    page.screenshot(path=str(SCREENSHOTS / "dagster-raw-export-partitions.png"), full_page=True)
    assert "raw_export" in page.inner_text("body")


def test_api_docs_render(stack, page) -> None:
    page.goto(f"{stack.api_url}/docs")
    page.get_by_text("/api/1/exports").first.wait_for()
    page.screenshot(path=str(SCREENSHOTS / "api-docs.png"), full_page=True)
    body = page.inner_text("body")
    assert "/api/1/events/{ref_id}/download" in body and "/health" in body
