"""The DLM REST API: `create_app()` is the factory `dlm api` runs; by hand:

uvicorn --factory dlm_api.app:create_app
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from botocore.exceptions import NoCredentialsError
from dagster import DagsterInstance
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import OperationalError

from dlm_api.deps import (
    RunStatuses,
    Services,
    TokenChecker,
    load_tokens,
    read_engine,
    require_caller,
)
from dlm_api.presign import Presigner
from dlm_api.routes import archives, events, exports, metrics, stats
from dlm_pipelines.settings import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
Find imaging data, get download links, follow each event's lifecycle.

Every `/api/1` route needs `Authorization: Bearer <token>` (a named token from
`DLM_API_TOKENS` or `DLM_API_TOKENS_FILE`). Datetimes in queries must carry an offset.
"""


def _log_audit_records() -> None:
    """Download-link records are INFO; show them when nothing else configures logging."""
    logger = logging.getLogger("dlm_api")
    logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def create_app(
    settings: Settings | None = None, instance: DagsterInstance | None = None
) -> FastAPI:
    """The API on `settings` (default: the environment) and a Dagster instance
    (default: `DagsterInstance.get()` from DAGSTER_HOME, opened on first use)."""
    settings = settings or get_settings()
    _log_audit_records()
    tokens = TokenChecker(load_tokens(settings))
    if not tokens and not settings.api_allow_anonymous:
        log.warning("no API tokens configured: every /api/1 request will answer 401")
    presigner = Presigner(settings.s3_endpoint_url, settings.aws_region, settings.presign_expires)
    services = Services(
        settings=settings,
        tokens=tokens,
        run_statuses=RunStatuses(instance),
        presigner=presigner,
        engine=read_engine(settings.database_url),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        services.engine.dispose()

    # /docs and /redoc with their scripts served from the wheel, not from a CDN: they
    # work on a lab network without internet access.
    app = FastAPIOffline(title="DLM", description=DESCRIPTION, version="1", lifespan=lifespan)
    app.state.services = services

    @app.get("/health", status_code=204, response_class=Response, tags=["health"])
    async def health() -> Response:
        return Response(status_code=204)

    api = APIRouter(
        prefix="/api/1",
        dependencies=[Depends(require_caller)],
        responses={401: {"description": "Missing or invalid bearer token."}},
    )
    for module in (exports, archives, stats, events):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(metrics.router)

    @app.exception_handler(OperationalError)
    async def catalog_unavailable(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("catalog unavailable: %s", exc)
        return JSONResponse({"detail": "catalog unavailable"}, status_code=503)

    @app.exception_handler(NoCredentialsError)
    async def no_credentials(_: Request, exc: NoCredentialsError) -> JSONResponse:
        log.error("cannot presign: %s", exc)
        return JSONResponse({"detail": "object store credentials are not configured"}, 503)

    return app
