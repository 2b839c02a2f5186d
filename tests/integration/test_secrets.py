"""No password reaches the Dagster UI: a real webserver loads the code location with
passwords in every store URL (from the environment and from `.env`), and its GraphQL
shows neither them in any resource's configured values nor in any job's default config.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.webserver import REPOSITORY, graphql, webserver

PASSWORD = "pw-never-shown-8f3a"


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cwd = tmp_path_factory.mktemp("cwd")
    # a password only in `.env`, as an operator of compose.yml would write it
    (cwd / ".env").write_text(f"DLM_RABBITMQ_URL=amqp://dlm:{PASSWORD}@127.0.0.1:1/%2F\n")
    env = {
        "DLM_DATABASE_URL": f"postgresql+psycopg2://dlm:{PASSWORD}@127.0.0.1:1/dlm",
        "DLM_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:1/0",
        # a webhook URL is a secret as a whole: its token is in the path
        "DLM_ALERT_WEBHOOK_URL": f"https://hooks.example/services/{PASSWORD}",
    }
    with webserver(tmp_path_factory.mktemp("dagster-home"), cwd, env) as url:
        yield url


def test_resources_show_the_variable_not_the_password(ui: str) -> None:
    data = graphql(
        ui,
        """query($repo: RepositorySelector!) {
          allTopLevelResourceDetailsOrError(repositorySelector: $repo) {
            __typename
            ... on ResourceDetailsList { results { name configuredValues { key value type } } }
          }
        }""",
        {"repo": REPOSITORY},
    )
    text = json.dumps(data)
    assert PASSWORD not in text
    resources = {
        r["name"]: {v["key"]: v for v in r["configuredValues"]}
        for r in data["allTopLevelResourceDetailsOrError"]["results"]
    }
    assert {"catalog", "streams", "archive_queue", "object_store", "alert_webhook"} <= set(
        resources
    )
    assert resources["catalog"]["database_url"] == {
        "key": "database_url",
        "value": "DLM_DATABASE_URL",
        "type": "ENV_VAR",
    }
    assert resources["streams"]["url"]["value"] == "DLM_REDIS_URL"
    assert resources["archive_queue"]["url"]["value"] == "DLM_RABBITMQ_URL"
    assert resources["alert_webhook"]["webhook_url"]["value"] == "DLM_ALERT_WEBHOOK_URL"


def test_no_job_offers_a_password_in_its_default_config(ui: str) -> None:
    data = graphql(
        ui,
        """query($repo: RepositorySelector!) {
          repositoryOrError(repositorySelector: $repo) {
            ... on Repository { jobs { name } }
          }
        }""",
        {"repo": REPOSITORY},
    )
    jobs = [j["name"] for j in data["repositoryOrError"]["jobs"]]
    assert {"__ASSET_JOB", "purge"} <= set(jobs)
    for job in jobs:
        schema = graphql(
            ui,
            """query($selector: PipelineSelector!) {
              runConfigSchemaOrError(selector: $selector) {
                __typename ... on RunConfigSchema { rootDefaultYaml }
              }
            }""",
            {"selector": {**REPOSITORY, "pipelineName": job}},
        )
        assert schema["runConfigSchemaOrError"]["__typename"] == "RunConfigSchema", job
        assert PASSWORD not in json.dumps(schema), job
