"""Every DLM setting, read from the environment (and an optional `.env` file).

The environment variable names are the public interface: they are documented in
the README and must not be renamed.
"""

from __future__ import annotations

import os
from datetime import date
from functools import cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or ".dlm/dagster").absolute()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DLM_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- stores -----------------------------------------------------------------
    redis_url: str = "redis://localhost:6379/0"
    data_root: Path = Path(".dlm/data")
    database_url: str = Field(
        default_factory=lambda: f"sqlite:///{default_dagster_home() / 'dlm-catalog.sqlite'}",
        description="SQLAlchemy URL of the catalog.",
    )
    s3_endpoint_url: str | None = None  # unset means AWS
    s3_bucket: str = "mycostreams-raw-data"
    # The standard AWS names, read without the DLM_ prefix. boto3 reads them too;
    # they are here so that one place documents and validates them.
    aws_access_key_id: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID")
    )
    aws_secret_access_key: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY")
    )
    aws_region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )

    # --- the imaging systems and their streams -----------------------------------
    systems: Annotated[list[str], NoDecode] = ["prince", "tsu-exp002", "tsu-exp003"]
    imaging_event_stream: str = "dlm:new-imaging-event"
    export_stream: str = "dlm:new-export"
    dead_letter_stream: str = "dlm:dead-letter"

    # --- export -----------------------------------------------------------------
    partition_start_date: date = date(2026, 1, 1)
    sensor_interval_seconds: int = Field(default=5, ge=1, le=5)
    sensor_batch_size: int = Field(default=500, ge=1, le=10_000)
    export_concurrency: int = Field(default=4, ge=1, le=64)
    export_part_size_mib: int = Field(default=16, ge=5, le=5 * 1024)
    export_part_concurrency: int = Field(default=4, ge=1, le=64)
    # Step retries of an export run (exponential backoff with jitter from this delay).
    export_max_retries: int = Field(default=5, ge=0, le=20)
    export_retry_delay_seconds: float = Field(default=2.0, ge=0, le=600)

    @field_validator("systems", mode="before")
    @classmethod
    def _split_systems(cls, value: object) -> object:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, list) and not value:
            raise ValueError("DLM_SYSTEMS must name at least one system")
        return value


@cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
