"""`dlm api`: serve the REST API with uvicorn (`uvicorn --factory dlm_api.app:create_app`
does the same without the defaults from settings)."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="default: DLM_API_HOST (127.0.0.1)")
    parser.add_argument("--port", type=int, help="default: DLM_API_PORT (8000)")
    parser.add_argument("--workers", type=int, help="default: DLM_API_WORKERS (2)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from dlm_api.deps import TokenConfigError, load_tokens
    from dlm_pipelines.settings import default_dagster_home, get_settings

    settings = get_settings()
    try:
        load_tokens(settings)  # fail here, clearly, rather than in every worker
    except TokenConfigError as exc:
        raise SystemExit(f"dlm api: {exc}") from None
    # Run status comes from DagsterInstance.get(); use the project's default home.
    os.environ.setdefault("DAGSTER_HOME", str(default_dagster_home()))
    uvicorn.run(
        "dlm_api.app:create_app",
        factory=True,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        workers=args.workers or settings.api_workers,
    )
    return 0
