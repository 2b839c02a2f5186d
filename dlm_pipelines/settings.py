"""Every DLM setting, read from the environment (and an optional `.env` file).

The environment variable names are the public interface: they are documented in
the README and must not be renamed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import date, timedelta
from functools import cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

from dotenv import load_dotenv
from pydantic import (
    AfterValidator,
    AliasChoices,
    AnyUrl,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_ANY_URL = TypeAdapter(AnyUrl)


def url_with(*schemes: str, host: bool = True) -> Callable[[str], str]:
    """A validator: the value parses as a URL (pydantic's AnyUrl) with one of `schemes`
    (`postgresql+psycopg2` counts as `postgresql`) and, unless `host=False`, a host.
    The value stays the string the operator wrote."""

    def check(value: str) -> str:
        try:
            url = _ANY_URL.validate_python(value)
        except ValidationError:
            raise ValueError("is not a URL") from None
        if url.scheme.split("+")[0] not in schemes:
            wanted = " or ".join(f"{s}://" for s in schemes)
            raise ValueError(f"needs a scheme, {wanted}")
        if host and not url.host:
            raise ValueError("has no host")
        return value

    return check


DatabaseUrl = Annotated[str, AfterValidator(url_with("postgresql", "sqlite", host=False))]
PostgresUrl = Annotated[str, AfterValidator(url_with("postgresql", "postgres"))]
RedisUrl = Annotated[str, AfterValidator(url_with("redis", "rediss", "unix", host=False))]
AmqpUrl = Annotated[str, AfterValidator(url_with("amqp", "amqps"))]
HttpUrl = Annotated[str, AfterValidator(url_with("http", "https"))]


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
    redis_url: RedisUrl = "redis://localhost:6379/0"
    data_root: Path = Path(".dlm/data")
    database_url: DatabaseUrl = Field(
        default_factory=lambda: f"sqlite:///{default_dagster_home() / 'dlm-catalog.sqlite'}",
        description="SQLAlchemy URL of the catalog.",
        examples=["postgresql+psycopg2://dlm:<password>@db:5432/dlm"],
    )
    # Set: the Dagster instance keeps runs, events and schedules in this PostgreSQL
    # database (dagster.postgres.yaml); unset: SQLite under DAGSTER_HOME.
    dagster_postgres_url: PostgresUrl | None = Field(
        default=None, examples=["postgresql://dlm:<password>@db:5432/dagster"]
    )
    s3_endpoint_url: HttpUrl | None = Field(  # unset means AWS
        default=None, examples=["http://127.0.0.1:8333"]
    )
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
    # Entries older than this are trimmed from the three streams (XTRIM MINID); the
    # imaging stream only below the sensor's cursor. Seconds or ISO-8601.
    stream_retention: timedelta = Field(default=timedelta(days=7), gt=timedelta(0))
    # Imaging events dated later than now + this are dead-lettered (a broken clock);
    # earlier ones in the future wait for their UTC day. Seconds or ISO-8601.
    event_max_future: timedelta = Field(default=timedelta(days=7), ge=timedelta(0))

    # --- archive notifications from the tape archiver (RabbitMQ) --------------------
    rabbitmq_url: AmqpUrl | None = Field(  # unset: archive_sensor idles and says why
        default=None, examples=["amqp://dlm:<password>@rabbitmq:5672/%2F"]
    )
    archive_queue: str = "dlm-archive-locations"
    archive_dead_letter_queue: str = "dlm-archive-locations.dead-letter"
    archive_batch_size: int = Field(default=200, ge=1, le=10_000)  # messages per tick

    # --- export -----------------------------------------------------------------
    partition_start_date: date = date(2026, 1, 1)
    sensor_interval_seconds: int = Field(default=1, ge=1, le=5)
    # Dagster's sensor daemon starts a round of ticks only every 5 s, whatever the
    # interval; a tick watches the stream for this long, recording each event as it
    # arrives (a warm run takes it), and returns early only to request a run. With the
    # daemon's own work around a tick, 3 s ends it before the next round (a tick still
    # running then waits for the round after: a 5 s gap). 0: read what is there.
    sensor_wait_seconds: float = Field(default=3.0, ge=0, le=30)
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
    # A run the sensor started stays warm: it keeps taking its partition's new events
    # until it has had none for the linger time, or has run for the maximum (0: no
    # lingering; backfills and UI runs never linger).
    export_linger_seconds: float = Field(default=30.0, ge=0, le=3600)
    export_max_run_seconds: float = Field(default=900.0, gt=0)
    # Never-tried events older than this, with no run waiting, get a run again.
    sensor_sweep_after_seconds: float = Field(default=300.0, gt=0)
    # Failed events are retried by the sweep: first after the backoff, doubling up to
    # the cap, until this many export runs have tried; then needs_attention.
    export_max_attempts: int = Field(default=10, ge=1, le=1000)
    export_retry_backoff_seconds: float = Field(default=60.0, gt=0)
    export_retry_backoff_max_seconds: float = Field(default=3600.0, gt=0)

    # --- purge of local copies (purger.py) --------------------------------------------
    purge_cron: str = "0 */2 * * *"
    purge_timezone: str = "Europe/Amsterdam"
    # Seconds or ISO-8601 (PT8H), counted from when the event was received.
    purge_lifespan: timedelta = Field(
        default=timedelta(hours=8), gt=timedelta(0), examples=["PT8H"]
    )
    purge_systems: Annotated[list[str], NoDecode] = Field(  # empty: delete nothing
        default=[], examples=["prince"]
    )
    purge_dry_run: bool = False
    # Percent of the data root's filesystem to keep free; below it, verified events
    # are purged oldest first before their lifespan. 0 turns this off.
    purge_min_free: float = Field(default=10.0, ge=0, le=100)
    purge_concurrency: int = Field(default=16, ge=1, le=64)  # HEAD checks at once
    # Also re-hash every file against the manifest before deleting (reads all the data).
    purge_verify_content: bool = False

    # --- reconciliation (jobs/reconcile.py), in DLM_PURGE_TIMEZONE --------------------------
    reconcile_cron: str = "0 3 * * *"
    # A folder no event names is reported once nothing in it changed for this long.
    reconcile_grace: timedelta = Field(default=timedelta(hours=1), ge=timedelta(0))
    # A verified export with no archive location nor tape tag after this is reported.
    reconcile_archive_after: timedelta = Field(default=timedelta(days=3), gt=timedelta(0))

    # --- the REST API (dlm_api) -----------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    # uvicorn worker processes: small requests in parallel. Signing a URL costs a few µs
    # (dlm_api/presign.py caches the SigV4 key), so one per core suffices.
    api_workers: int = Field(default=2, ge=1, le=64)
    presign_expires: int = Field(default=3600, ge=1, le=7 * 24 * 3600)  # SigV4 max: 7 days
    api_tokens: SecretStr | None = Field(  # "name:token,name:token"
        default=None, examples=["lab:<token>,ops:<token>"]
    )
    api_tokens_file: Path | None = None  # one "name:token" per line; '#' starts a comment
    api_allow_anonymous: bool = False  # only for legacy clients behind a trusted proxy
    # true: GET /metrics answers without a token (a Prometheus on a trusted network)
    metrics_allow_anonymous: bool = False
    dagster_ui_url: HttpUrl = "http://127.0.0.1:3000"

    # --- alerts (alerts.py) ------------------------------------------------------------
    # Slack-, Mattermost- or Teams-compatible incoming webhook; unset: no alerts are sent.
    alert_webhook_url: HttpUrl | None = Field(
        default=None, examples=["https://hooks.slack.com/services/T000/B000/XXXX"]
    )

    @field_validator("systems", mode="before")
    @classmethod
    def _split_systems(cls, value: object) -> object:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one system")
        return value

    @field_validator("purge_systems", mode="before")
    @classmethod
    def _split_purge_systems(cls, value: object) -> object:
        if isinstance(value, str):
            value = [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator(
        "purge_lifespan",
        "stream_retention",
        "event_max_future",
        "reconcile_grace",
        "reconcile_archive_after",
        mode="before",
    )
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
            raise ValueError("is not an IANA time zone") from None
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


SECRET_FIELDS = frozenset({"api_tokens", "aws_secret_access_key", "alert_webhook_url"})


class SettingsError(ValueError):
    """Settings that cannot be used; the message has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def variable_of(field: str) -> str:
    """The environment variable that sets `field`."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    choices = getattr(alias, "choices", None)
    if choices:
        return str(choices[0])
    return f"DLM_{field.upper()}"


def _shown(field: str, value: Any) -> str:
    """The offending value as an operator may see it: no secret, no URL password."""
    if field in SECRET_FIELDS:
        return "'***'"
    text = str(value)
    try:
        return repr(hide_password(text))
    except ValueError:  # not even a URL (a bad port): hide what looks like a password
        password = text.partition("@")[0].rpartition(":")[2] if "@" in text else ""
        return repr(text.replace(f":{password}@", ":***@", 1) if password else text)


def _example(field: str) -> str | None:
    info = Settings.model_fields.get(field)
    if info is None:
        return None
    if info.examples:
        return str(info.examples[0])
    default = info.get_default(call_default_factory=False)
    if default is None or callable(default):
        return None
    if isinstance(default, list):
        return ",".join(map(str, default))
    return str(default)


def settings_problems(error: ValidationError) -> list[str]:
    """One line per problem: the variable, its value, what is wrong, an example."""
    lines = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a check across settings names its variables itself
            lines.append(message)
            continue
        field = str(problem["loc"][0])
        variable = variable_of(field)
        line = f"{variable}={_shown(field, problem.get('input'))}: {message}"
        if problem["type"] == "missing":
            line = f"{variable}: is required"
        example = _example(field)
        if example is not None:
            line += f" (e.g. {variable}={example})"
        lines.append(line)
    return lines


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and `.env`); SettingsError names every bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(settings_problems(exc)) from None


@cache
def get_settings() -> Settings:
    """The process-wide settings, read once. `.env` is loaded into the environment
    first (without overriding it), so the processes this one starts, and Dagster's
    EnvVar, see the same values."""
    load_dotenv(".env", override=False)
    return load_settings()
