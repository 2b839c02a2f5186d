"""`dlm reconcile`: the reconcile job's work from the command line.

Prints the report (exit status 1 when a finding is an alarm). `--adopt` then records
every object no event owns from its tar's metadata.json, so the API lists it.
"""

from __future__ import annotations

import argparse
from typing import Any, cast

SHOWN = 50  # findings printed; GET /api/1/reconciliation pages through all of them


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "reconcile", help="compare catalog, S3, local disks and tape; print the report"
    )
    parser.add_argument(
        "--adopt",
        action="store_true",
        help="record objects no event owns (object_without_event) from their tar's "
        "metadata.json, so /api/1/exports lists them",
    )
    parser.add_argument("--show", type=int, default=SHOWN, help="findings to print")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dlm_pipelines.catalog import Catalog
    from dlm_pipelines.definitions import build_resources
    from dlm_pipelines.jobs.reconcile import build_reconciler
    from dlm_pipelines.reconciler import Kind, adopt, render
    from dlm_pipelines.resources import DataRoot, ObjectStore
    from dlm_pipelines.settings import get_settings

    settings = get_settings()
    resources = build_resources(settings)  # the same stores the Dagster job uses
    catalog = cast(Catalog, resources["catalog"])
    store = cast(ObjectStore, resources["object_store"])
    data_root = cast(DataRoot, resources["data_root"])
    report = build_reconciler(settings, catalog, store, data_root).run()
    findings = catalog.findings_of(report.report_id)
    print(render(report, findings[: args.show]))
    if len(findings) > args.show:
        print(f"... {len(findings) - args.show} more: GET /api/1/reconciliation")
    if args.adopt:
        keys = [f.key for f in findings if f.kind == Kind.OBJECT_WITHOUT_EVENT and f.key]
        outcome = adopt(catalog, store.client, store.bucket, keys, settings.systems)
        for key, result in outcome.items():
            print(f"adopt {key}: {result}")
        print(f"adopted {sum(r == 'adopted' for r in outcome.values())} of {len(outcome)}")
    return 1 if report.alarms else 0
