"""What the routes depend on: the services built once per app (catalog engine,
presigner, run status from the Dagster instance) and the caller's token.

Routes are async and do their blocking work (catalog, signing) in one trip through
FastAPI's threadpool; dependencies here do no I/O, so they stay on the event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from typing import Annotated

import sqlalchemy as sa
from dagster import DagsterInstance
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine

from dlm_api.presign import Presigner
from dlm_pipelines.catalog import get_engine
from dlm_pipelines.settings import Settings

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


def read_engine(database_url: str) -> Engine:
    """The routes' engine: they only read, so on PostgreSQL in autocommit (no BEGIN and
    ROLLBACK round trips) and without a pre-ping round trip per request: after a database
    restart a stale connection fails one request (503) and the pool is renewed."""
    if database_url.startswith("sqlite"):
        return get_engine(database_url)  # the catalog's own (WAL, busy timeout)
    return sa.create_engine(
        database_url, isolation_level="AUTOCOMMIT", pool_size=20, max_overflow=20
    )


class TokenConfigError(ValueError):
    """DLM_API_TOKENS or the tokens file is malformed (the message never shows a token)."""


def parse_tokens(entries: list[tuple[str, str]]) -> dict[str, str]:
    """`(where, "name:token")` entries → {name: token}; duplicates are errors."""
    tokens: dict[str, str] = {}
    for where, entry in entries:
        name, sep, token = (part.strip() for part in entry.partition(":"))
        if not sep or not name or not token:
            raise TokenConfigError(f"{where}: expected 'name:token'")
        if name in tokens:
            raise TokenConfigError(f"{where}: token name {name!r} is given twice")
        if token in tokens.values():
            raise TokenConfigError(f"{where}: the token of {name!r} is also another name's")
        tokens[name] = token
    return tokens


def load_tokens(settings: Settings) -> dict[str, str]:
    """Named tokens from DLM_API_TOKENS and the file DLM_API_TOKENS_FILE, if set."""
    entries: list[tuple[str, str]] = []
    if settings.api_tokens is not None:
        raw = settings.api_tokens.get_secret_value()
        items = [item for item in raw.split(",") if item.strip()]
        entries += [(f"DLM_API_TOKENS entry {i}", item) for i, item in enumerate(items, 1)]
    if settings.api_tokens_file is not None:
        path = settings.api_tokens_file
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise TokenConfigError(f"DLM_API_TOKENS_FILE {path}: {exc.strerror}") from None
        entries += [
            (f"{path} line {n}", line)
            for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    return parse_tokens(entries)


class TokenChecker:
    """Matches a presented token against every known one in constant time.

    Both sides are hashed first, so neither the length nor the position of a
    token leaks through timing; every token is compared, match or not.
    """

    def __init__(self, tokens: dict[str, str]) -> None:
        self._digests = [(name, self._digest(token)) for name, token in tokens.items()]

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def __len__(self) -> int:
        return len(self._digests)

    def name_of(self, presented: str) -> str | None:
        digest = self._digest(presented)
        found = None
        for name, known in self._digests:
            if hmac.compare_digest(digest, known):
                found = name
        return found


class RunStatuses:
    """Run status through the public DagsterInstance API.

    The instance is opened on first use (DAGSTER_HOME) unless one is given; if it
    cannot be opened, statuses are None and it is retried a minute later. Finished
    runs never change status and missing runs do not come back, so both are
    remembered (bounded).
    """

    MAX_REMEMBERED = 10_000
    RETRY_SECONDS = 60.0

    def __init__(self, instance: DagsterInstance | None) -> None:
        self._instance = instance
        self._settled: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._retry_at = 0.0

    def instance(self) -> DagsterInstance | None:
        """The Dagster instance, or None while it cannot be opened."""
        return self._get_instance()

    def _get_instance(self) -> DagsterInstance | None:
        with self._lock:
            if self._instance is None and time.monotonic() >= self._retry_at:
                try:
                    self._instance = DagsterInstance.get()
                except Exception as exc:  # no DAGSTER_HOME, unreadable dagster.yaml, ...
                    self._retry_at = time.monotonic() + self.RETRY_SECONDS
                    log.warning("Dagster instance unavailable, no run status: %s", exc)
            return self._instance

    def status_of(self, run_id: str) -> str | None:
        """The run's status name, or None if the run or the instance is unknown."""
        if run_id in self._settled:
            return self._settled[run_id]
        instance = self._get_instance()
        if instance is None:
            return None
        try:
            run = instance.get_run_by_id(run_id)
        except Exception as exc:  # run storage down: the rest of the lifecycle still answers
            log.warning("cannot read run %s from the Dagster instance: %s", run_id, exc)
            return None
        status = run.status.value if run is not None else None
        if run is None or run.is_finished:
            if len(self._settled) >= self.MAX_REMEMBERED:
                self._settled.clear()
            self._settled[run_id] = status
        return status


@dataclass
class Services:
    """Everything the routes share, built once per app (and process)."""

    settings: Settings
    tokens: TokenChecker
    run_statuses: RunStatuses
    presigner: Presigner
    engine: Engine  # read_engine(settings.database_url)

    def dagster_run_url(self, run_id: str) -> str:
        return f"{self.settings.dagster_ui_url.rstrip('/')}/runs/{run_id}"


async def get_services(request: Request) -> Services:
    """Async, as it does no I/O: FastAPI would run a sync one in its threadpool."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


_bearer = HTTPBearer(auto_error=False, description="A named token from DLM_API_TOKENS.")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


async def require_caller(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The name of the caller's token; 401 without a valid one.

    Anonymous callers pass only with DLM_API_ALLOW_ANONYMOUS=true, and only when
    they send no Authorization header at all: a wrong token is always refused.
    """
    if credentials is None:
        if "authorization" not in request.headers and services.settings.api_allow_anonymous:
            return ANONYMOUS
        raise _unauthorized("missing bearer token (Authorization: Bearer <token>)")
    name = services.tokens.name_of(credentials.credentials)
    if name is None:
        raise _unauthorized("invalid token")
    return name


CallerDep = Annotated[str, Depends(require_caller)]


async def require_metrics_caller(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """/metrics: like /api/1, unless DLM_METRICS_ALLOW_ANONYMOUS lets every scraper in."""
    if services.settings.metrics_allow_anonymous:
        return ANONYMOUS
    return await require_caller(request, services, credentials)
