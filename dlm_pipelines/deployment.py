"""Preparing a deployment: the catalog schema, the Dagster instance, the bucket.

`dlm setup` runs every step, idempotently, before the long-running processes
start (compose runs it as a one-shot service); `make dev` and the end-to-end tests
call the same `set_up`. The catalog's schema has one entry point,
`dlm_pipelines.catalog.migrate`, which `dlm migrate` and this module call.

The Dagster instance file follows one rule everywhere: with
`DLM_DAGSTER_POSTGRES_URL` set, runs, events and schedules live in PostgreSQL
(`dagster.postgres.yaml`), otherwise in SQLite under DAGSTER_HOME (`dagster.yaml`).
Both files live at the project root; the copy in DAGSTER_HOME is rewritten on every
setup, so the repository stays the source of truth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dlm_pipelines.resources import ObjectStore

SQLITE_CONFIG = "dagster.yaml"
POSTGRES_CONFIG = "dagster.postgres.yaml"


def instance_config(project_dir: Path, postgres_url: str | None) -> Path:
    """The instance file for this setup: PostgreSQL storage when a URL is given."""
    chosen = project_dir / (POSTGRES_CONFIG if postgres_url else SQLITE_CONFIG)
    if not chosen.is_file():
        raise FileNotFoundError(f"{chosen} not found: run from the project root")
    return chosen


def prepare_dagster_home(home: Path, project_dir: Path, postgres_url: str | None) -> Path:
    """Create `home` and copy the chosen instance file to `home/dagster.yaml`."""
    home = home.absolute()
    home.mkdir(parents=True, exist_ok=True)
    source = instance_config(project_dir, postgres_url)
    target = home / "dagster.yaml"
    if not target.exists() or target.read_bytes() != source.read_bytes():
        shutil.copyfile(source, target)
    return source


def migrate_dagster_instance(
    env: Mapping[str, str], cwd: Path, log_path: Path, timeout: float = 300
) -> None:
    """`dagster instance migrate`: create or upgrade the instance's storage.

    Run once before the webserver and daemon start: two processes creating a new
    SQLite instance at the same moment corrupt its schema version table, and a
    persistent instance needs upgrading after a Dagster upgrade.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    dagster = Path(sys.executable).parent / "dagster"
    with open(log_path, "wb") as log:
        result = subprocess.run(
            [str(dagster), "instance", "migrate"],
            env=dict(env),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"`dagster instance migrate` failed; see {log_path}:\n{tail}")


def set_up(
    *,
    database_url: str,
    dagster_postgres_url: str | None,
    dagster_home: Path,
    project_dir: Path,
    env: Mapping[str, str],
    say: Callable[[str], None],
) -> None:
    """Catalog schema, then the Dagster instance file and its storage schema."""
    from dlm_pipelines.catalog import migrate

    migrate(database_url)
    say("catalog schema is up to date")
    source = prepare_dagster_home(dagster_home, project_dir, dagster_postgres_url)
    migrate_dagster_instance(env, project_dir, dagster_home / "migrate.log")
    say(f"Dagster instance {dagster_home} ({source.name}) is up to date")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--project-dir", type=Path, default=Path.cwd(), help="where dagster*.yaml are"
    )
    parser.add_argument(
        "--create-bucket", action="store_true", help="create DLM_S3_BUCKET if it is missing"
    )


def run(args: argparse.Namespace) -> int:
    from dlm_pipelines.resources import ObjectStore
    from dlm_pipelines.settings import get_settings

    settings = get_settings()
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise SystemExit("dlm setup: DAGSTER_HOME is not set")
    set_up(
        database_url=settings.database_url,
        dagster_postgres_url=settings.dagster_postgres_url,
        dagster_home=Path(home).absolute(),
        project_dir=args.project_dir,
        env=os.environ,
        say=lambda line: print(line, flush=True),
    )
    store = ObjectStore(
        bucket=settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.aws_region,
    )
    if args.create_bucket:
        store.ensure_bucket()
    check_bucket(store)
    print(f"bucket {settings.s3_bucket} exists and is writable", flush=True)
    return 0


def check_bucket(store: ObjectStore) -> None:
    """The bucket exists and takes a write, or SettingsError says which setting to fix.

    Found here, once, rather than as NoSuchBucket in the first export run after all
    its retries.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from dlm_pipelines.settings import SettingsError

    where = store.endpoint_url or "AWS"
    probe = f".dlm-setup-probe/{uuid.uuid4().hex}"
    try:
        store.client.head_bucket(Bucket=store.bucket)
        store.client.put_object(Bucket=store.bucket, Key=probe, Body=b"")
        store.client.delete_object(Bucket=store.bucket, Key=probe)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            problem = (
                f"DLM_S3_BUCKET={store.bucket!r}: no such bucket at {where} "
                "(create it, or run `dlm setup --create-bucket`)"
            )
        else:
            problem = (
                f"DLM_S3_BUCKET={store.bucket!r}: not writable at {where} with "
                f"AWS_ACCESS_KEY_ID={os.environ.get('AWS_ACCESS_KEY_ID', '')!r}: {code or exc}"
            )
        raise SettingsError([problem]) from None
    except BotoCoreError as exc:  # no credentials, endpoint unreachable
        raise SettingsError([f"DLM_S3_ENDPOINT_URL={where!r}: {exc}"]) from None
