"""Schemathesis over /openapi.json, in-process: no input makes any route answer 5xx,
and every response matches the schema the API publishes (status, type, body)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dlm_api.app import create_app
from dlm_pipelines.reconciler import Reconciler
from tests.integration.test_api import AUTH, api_settings, insert_archive, insert_event

pytestmark = pytest.mark.integration
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_no_input_makes_the_api_fail(catalog, object_store, dagster_instance, tmp_path) -> None:
    # a catalog with something in it, so the routes do real work
    row = insert_event(catalog, object_store.bucket)
    insert_event(catalog, verified=False, status="failed", last_error="boom", run_id="r-1")
    insert_archive(catalog, "images/exp-a/20261130.tar", [(row["object_key"], row["ref_id"])])
    report = Reconciler(catalog, object_store.client, object_store.bucket, tmp_path, ["prince"])
    assert report.run().counts  # the object is missing: GET /api/1/reconciliation has a page
    app = create_app(api_settings(catalog, object_store, tmp_path), dagster_instance)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )

    # Bounded, so the run stays well under a minute.
    @given(case=cases)
    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def no_server_error(case) -> None:
        case.call_and_validate(headers=AUTH, checks=CHECKS)

    no_server_error()
