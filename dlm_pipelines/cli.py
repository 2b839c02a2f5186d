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
    # Further subcommands register here: api, mock-prince, dev.
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
