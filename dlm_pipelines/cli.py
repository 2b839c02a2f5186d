"""The `dlm` command. Each subcommand lives with the code it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _migrate(_: argparse.Namespace) -> int:
    from dlm_pipelines.catalog import migrate
    from dlm_pipelines.settings import get_settings

    migrate(get_settings().database_url)
    print("catalog schema is up to date")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm", description="Data lifecycle manager")
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser("migrate", help="create or upgrade the catalog schema")
    migrate.set_defaults(handler=_migrate)
    from dlm_pipelines import deployment
    from dlm_pipelines.dev import mock_prince, stack

    producer = sub.add_parser("mock-prince", help="produce imaging events like the microscopes")
    mock_prince.add_arguments(producer)
    producer.set_defaults(handler=mock_prince.run)
    dev = sub.add_parser("dev", help="run the whole stack on this machine (Ctrl-C stops it)")
    stack.add_arguments(dev)
    dev.set_defaults(handler=stack.run)
    setup = sub.add_parser(
        "setup", help="migrate the catalog and Dagster instance, make the bucket"
    )
    deployment.add_arguments(setup)
    setup.set_defaults(handler=deployment.run)
    from dlm_pipelines import manifest_backfill

    backfill = sub.add_parser(
        "backfill-manifests", help="record manifests of exports made before them (one-off)"
    )
    manifest_backfill.add_arguments(backfill)
    backfill.set_defaults(handler=manifest_backfill.run)
    from dlm_pipelines import health

    status = sub.add_parser(
        "status", help="backlog, failures, dead letters, purges, disk, services (exit 1: look)"
    )
    health.add_arguments(status)
    status.set_defaults(handler=health.run)
    from dlm_api import serve

    api = sub.add_parser("api", help="serve the REST API (find data, download links)")
    serve.add_arguments(api)
    api.set_defaults(handler=serve.run)
    from dlm_pipelines import reconcile_command

    reconcile_command.register(sub)
    return parser


CONFIG_ERROR = 2  # as argparse's usage errors: the command was given something unusable


def main(argv: list[str] | None = None) -> int:
    from dlm_pipelines.settings import SettingsError, get_settings

    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        get_settings()  # every setting, checked before any work starts
        return handler(args)
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"dlm {args.command}: {problem}", file=sys.stderr)
        return CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
