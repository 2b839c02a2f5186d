"""Every DLM setting, read from the environment (and an optional `.env` file).

The environment variable names are the public interface: they are documented in
the README and must not be renamed.
"""

from __future__ import annotations

import os
from datetime import date, timedelta
from functools import cache
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def hide_password(url: str) -> str:
    """The URL with its password replaced by `***`, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


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
    # Set: the Dagster instance keeps runs, events and schedules in this PostgreSQL
    # database (dagster.postgres.yaml); unset: SQLite under DAGSTER_HOME.
    dagster_postgres_url: str | None = None
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

    # --- archive notifications from the tape archiver (RabbitMQ) --------------------
    rabbitmq_url: str | None = None  # unset: archive_sensor idles and says why
    archive_queue: str = "dlm-archive-locations"
    archive_dead_letter_queue: str = "dlm-archive-locations.dead-letter"
    archive_batch_size: int = Field(default=200, ge=1, le=10_000)  # messages per tick

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
    # Liveness of export runs (the default run launcher cannot see a dead run worker):
    # a run logs a heartbeat this often, and one silent for longer than the stale limit
    # is marked failed, so its events are exported again and its system is unblocked.
    export_heartbeat_seconds: float = Field(default=30.0, gt=0, le=600)
    export_stale_after_seconds: float = Field(default=300.0, gt=0)
    # Never-tried events older than this, with no run waiting, get a run again.
    sensor_sweep_after_seconds: float = Field(default=300.0, gt=0)

    # --- purge of local copies (purger.py) --------------------------------------------
    purge_cron: str = "0 */2 * * *"
    purge_timezone: str = "Europe/Amsterdam"
    # Seconds or ISO-8601 (PT8H), counted from when the event was received.
    purge_lifespan: timedelta = Field(default=timedelta(hours=8), gt=timedelta(0))
    purge_systems: Annotated[list[str], NoDecode] = []  # empty: delete nothing
    purge_dry_run: bool = False
    # Percent of the data root's filesystem to keep free; below it, verified events
    # are purged oldest first before their lifespan. 0 turns this off.
    purge_min_free: float = Field(default=10.0, ge=0, le=100)
    purge_concurrency: int = Field(default=16, ge=1, le=64)  # HEAD checks at once
    # Also re-hash every file against the manifest before deleting (reads all the data).
    purge_verify_content: bool = False

    # --- the REST API (dlm_api) -----------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    # uvicorn worker processes: small requests in parallel. Each signs URLs with a pool
    # of one process per core (dlm_api/presign.py), so a few workers suffice.
    api_workers: int = Field(default=2, ge=1, le=64)
    presign_expires: int = Field(default=3600, ge=1, le=7 * 24 * 3600)  # SigV4 max: 7 days
    api_tokens: SecretStr | None = None  # "name:token,name:token"
    api_tokens_file: Path | None = None  # one "name:token" per line; '#' starts a comment
    api_allow_anonymous: bool = False  # only for legacy clients behind a trusted proxy
    dagster_ui_url: str = "http://127.0.0.1:3000"

    @field_validator("systems", mode="before")
    @classmethod
    def _split_systems(cls, value: object) -> object:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, list) and not value:
            raise ValueError("DLM_SYSTEMS must name at least one system")
        return value

    @field_validator("purge_systems", mode="before")
    @classmethod
    def _split_purge_systems(cls, value: object) -> object:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("purge_lifespan", mode="before")
    @classmethod
    def _lifespan_in_seconds(cls, value: object) -> object:
        # pydantic parses ISO-8601 durations and numbers, but not digits in a string.
        if isinstance(value, str) and value.strip().replace(".", "", 1).isdigit():
            return float(value)
        return value

    @field_validator("purge_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ValueError, KeyError):
            raise ValueError(f"DLM_PURGE_TIMEZONE: {value!r} is not an IANA time zone") from None
        return value

    @model_validator(mode="after")
    def _purge_systems_are_systems(self) -> Settings:
        unknown = sorted(set(self.purge_systems) - set(self.systems))
        if unknown:
            raise ValueError(
                f"DLM_PURGE_SYSTEMS names {', '.join(unknown)}, not in DLM_SYSTEMS "
                f"({', '.join(self.systems)})"
            )
        return self


@cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
