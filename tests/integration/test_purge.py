"""The purge against real SeaweedFS, PostgreSQL and Dagster: only provably safe copies go.

`Lab` (also used by test_purge_property.py) makes events the way production does:
folders on disk, rows in the catalog, tars exported by the real Exporter.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from dagster import AssetKey, DagsterEventType

from dlm_pipelines.catalog import Catalog, EventRecord, EventStatus, migrate, utcnow
from dlm_pipelines.definitions import build_definitions
from dlm_pipelines.events import parse_imaging_event
from dlm_pipelines.exporter import Exporter
from dlm_pipelines.partitions import partition_key_for
from dlm_pipelines.purge_policy import (
    NOT_OPTED_IN,
    NOT_VERIFIED,
    TOO_YOUNG,
    DiskLevel,
    PurgePolicy,
    Why,
)
from dlm_pipelines.purger import (
    CHANGED_LOCALLY,
    HELD,
    SOURCE_MISSING,
    UNSAFE_SOURCE,
    PurgeOutcome,
    Purger,
)
from dlm_pipelines.resources import DataRoot, ObjectStore, RedisStreams
from tests.integration.helpers import make_event, make_settings, untar

pytestmark = pytest.mark.integration
SYSTEMS = ("prince", "tsu-exp002", "tsu-exp003")
LIFESPAN = timedelta(hours=8)
OLD = timedelta(hours=9)
YOUNG = timedelta(hours=1)
ROOMY = DiskLevel(total=10**12, free=10**12)
PRINCE_ONLY = PurgePolicy(frozenset({"prince"}), LIFESPAN, min_free_percent=0)


@dataclass
class Lab:
    catalog: Catalog
    store: ObjectStore
    streams: RedisStreams
    root: Path

    def add(
        self,
        *,
        system: str = "prince",
        age: timedelta = OLD,
        files: dict[str, bytes] | None = None,
        single_file: bytes | None = None,
        local_path: str | None = None,
    ) -> EventRecord:
        """An event in the catalog, received `age` ago, with its data on disk."""
        experiment_id = f"exp-{uuid.uuid4().hex[:8]}"
        if single_file is not None:  # a video: one file, written here
            local_path = f"Video/{uuid.uuid4().hex[:8]}.avi"
            path = self.root / system / local_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(single_file)
        fields = make_event(
            self.root,
            system=system,
            experiment_id=experiment_id,
            files=files,
            local_path=local_path,
            event_type="stitch" if single_file is None else "video",
            write=single_file is None,
        )
        event = parse_imaging_event(fields, SYSTEMS)
        received_at = utcnow() - age
        self.catalog.record_events([(event, "0-1", partition_key_for(event))], received_at)
        return self.get(event.ref_id)

    def get(self, ref_id: str) -> EventRecord:
        record = self.catalog.get(ref_id)
        assert record is not None
        return record

    def exporter(self, run_id: str = "export-run") -> Exporter:
        return Exporter(
            catalog=self.catalog,
            store=self.store,
            streams=self.streams,
            data_root=DataRoot(path=str(self.root)),
            run_id=run_id,
            run_is_alive=lambda _other: False,
        )

    def export(self, record: EventRecord, *, force: bool = False) -> EventRecord:
        outcome = self.exporter().export(record, force=force)
        assert outcome.exported, outcome
        return self.get(record.ref_id)

    def add_exported(self, **kwargs: Any) -> EventRecord:
        return self.export(self.add(**kwargs))

    def source(self, record: EventRecord) -> Path:
        return self.root / record.system / record.local_path

    def purger(self, policy: PurgePolicy = PRINCE_ONLY, **kwargs: Any) -> Purger:
        return Purger(
            catalog=self.catalog,
            store=self.store,
            data_root=self.root,
            policy=policy,
            run_id=f"purge-{uuid.uuid4().hex[:8]}",
            **kwargs,
        )

    def purge(self, disk: DiskLevel = ROOMY, **kwargs: Any) -> dict[str, PurgeOutcome]:
        outcomes = self.purger(**kwargs).run(utcnow(), disk)
        return {o.record.ref_id: o for o in outcomes}


def file_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def files_outside(folder: Path, data_root: Path) -> dict[Path, bytes]:
    return {
        p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and data_root not in p.parents
    }


@pytest.fixture
def lab(catalog, object_store, streams, data_root) -> Lab:
    return Lab(catalog, object_store, streams, Path(data_root.path))


def run_purge_job(lab: Lab, dagster_instance, dry_run: bool | None = None, **settings: Any):
    values = {"purge_systems": "prince", "purge_min_free": 0, **settings}
    defs = build_definitions(
        make_settings(lab.catalog, lab.store, lab.streams, DataRoot(path=str(lab.root)), **values)
    )
    run_config = {}
    if dry_run is not None:
        run_config = {"ops": {"purge_local_copies": {"config": {"dry_run": dry_run}}}}
    return defs.resolve_job_def("purge").execute_in_process(
        instance=dagster_instance, run_config=run_config, raise_on_error=False
    )


def run_metadata(result) -> dict[str, Any]:
    """The purge op's metadata, from its output (success) or its Failure."""
    failure = result.failure_data_for_node("purge_local_copies")
    if failure is not None:
        metadata = failure.user_failure_data.metadata
    else:
        (output,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_OUTPUT]
        metadata = output.event_specific_data.metadata
    return {key: value.value for key, value in metadata.items()}


def test_the_job_purges_every_due_verified_event_and_nothing_else(lab, dagster_instance) -> None:
    due = lab.add_exported(files={"a.tif": b"a" * 5000, "sub/b.tif": b"b" * 700})
    long_ago = lab.add_exported(age=timedelta(days=30))  # no window: missed runs lose nothing
    single = lab.add_exported(single_file=b"v" * 3000)
    young = lab.add_exported(age=YOUNG)
    never_exported = lab.add()
    other_system = lab.add_exported(system="tsu-exp002")
    expected_bytes = {r.ref_id: file_bytes(lab.source(r)) for r in (due, long_ago, single)}

    result = run_purge_job(lab, dagster_instance)

    assert result.success
    for ref_id, size in expected_bytes.items():
        record = lab.get(ref_id)
        assert not lab.source(record).exists()
        assert record.status == EventStatus.VERIFIED and record.purged_at is not None
        assert record.bytes_freed == size
        assert record.run_id == "export-run"  # still names the run that made the object
    for kept in (young, never_exported, other_system):
        assert lab.source(kept).exists() and lab.get(kept.ref_id).purged_at is None
    assert (lab.root / "prince").is_dir()  # never the system folder itself

    metadata = run_metadata(result)
    assert metadata["purged"] == 3 and metadata["bytes freed"] == sum(expected_bytes.values())
    assert metadata["per system"]["prince"] == {
        "purged": 3,
        "bytes freed": sum(expected_bytes.values()),
        "skipped": 2,
    }
    assert metadata["per system"]["tsu-exp002"] == {"skipped": 1}
    assert metadata["skip reasons"] == {TOO_YOUNG: 1, NOT_VERIFIED: 1, NOT_OPTED_IN: 1}
    assert {row.data["ref_id"] for row in metadata["deleted"].records} == set(expected_bytes)

    observed = dagster_instance.fetch_observations(AssetKey("raw_export"), limit=10).records
    partitions = {r.partition_key for r in observed}
    assert partitions == {due.partition_key, long_ago.partition_key}
    assert sum(r.asset_observation.metadata["purged"].value for r in observed) == 3


def test_dry_run_lists_exactly_what_would_be_deleted_and_changes_nothing(
    lab, dagster_instance
) -> None:
    records = [lab.add_exported() for _ in range(3)] + [lab.add_exported(age=YOUNG), lab.add()]
    before = {r.ref_id: lab.get(r.ref_id).model_dump() for r in records}

    dry = run_metadata(run_purge_job(lab, dagster_instance, dry_run=True))

    assert dry["dry run"] is True
    assert all(lab.source(r).exists() for r in records)
    assert {r.ref_id: lab.get(r.ref_id).model_dump() for r in records} == before
    would = {(row.data["ref_id"], row.data["path"]) for row in dry["would be deleted"].records}
    assert dry["would be purged"] == 3

    real = run_metadata(run_purge_job(lab, dagster_instance))
    deleted = {(row.data["ref_id"], row.data["path"]) for row in real["deleted"].records}
    assert would == deleted == {(r.ref_id, str(lab.source(r))) for r in records[:3]}
    assert dry["bytes would be freed"] == real["bytes freed"] > 0


def test_dry_run_is_the_default_when_the_setting_says_so(lab, dagster_instance) -> None:
    record = lab.add_exported()
    metadata = run_metadata(run_purge_job(lab, dagster_instance, purge_dry_run=True))
    assert metadata["dry run"] is True and lab.source(record).exists()


def test_an_object_overwritten_in_s3_blocks_its_purge_and_raises_the_alarm(
    lab, dagster_instance
) -> None:
    tampered = lab.add_exported()
    healthy = lab.add_exported()
    assert tampered.object_key is not None
    lab.store.client.put_object(
        Bucket=lab.store.bucket,
        Key=tampered.object_key,
        Body=os.urandom(tampered.size or 0),  # other bytes, same size, same ref-id
        Metadata={"ref-id": tampered.ref_id},
    )

    result = run_purge_job(lab, dagster_instance)

    assert not result.success
    failure = result.failure_data_for_node("purge_local_copies")
    assert tampered.ref_id in failure.user_failure_data.description
    assert "sha256" in failure.user_failure_data.description
    record = lab.get(tampered.ref_id)
    assert record.status == EventStatus.NEEDS_ATTENTION and "sha256" in (record.last_error or "")
    assert lab.source(tampered).exists() and record.purged_at is None
    assert not lab.source(healthy).exists()  # the others are still purged
    observed = dagster_instance.fetch_observations(AssetKey("raw_export"), limit=10).records
    (observation,) = observed
    assert tampered.ref_id in observation.asset_observation.metadata["needs attention"].value

    # Never purged while it needs attention; a re-export repairs it, and then it goes.
    assert run_purge_job(lab, dagster_instance).success and lab.source(tampered).exists()
    lab.export(record)
    assert run_purge_job(lab, dagster_instance).success and not lab.source(tampered).exists()


@pytest.mark.parametrize("corruption", ["missing", "wrong sha256 metadata", "size changed"])
def test_every_mismatch_with_the_store_is_an_alarm(lab, corruption: str) -> None:
    record = lab.add_exported()
    key, bucket = record.object_key, lab.store.bucket
    body = lab.store.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    if corruption == "missing":
        lab.store.client.delete_object(Bucket=bucket, Key=key)
    elif corruption == "wrong sha256 metadata":
        metadata = {"ref-id": record.ref_id, "sha256": "0" * 64}
        lab.store.client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata)
    else:
        metadata = {"ref-id": record.ref_id, "sha256": record.sha256 or ""}
        lab.store.client.put_object(Bucket=bucket, Key=key, Body=body[:-512], Metadata=metadata)

    outcome = lab.purge()[record.ref_id]

    assert outcome.alarm is not None and outcome.why is None
    assert lab.source(record).exists()
    assert lab.get(record.ref_id).status == EventStatus.NEEDS_ATTENTION


def test_escapes_never_delete_outside_the_data_root(lab, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.tif").write_bytes(b"p" * 100)
    prince = lab.root / "prince"

    # exported, then the folder was replaced by a symlink out of the data root
    swapped = lab.add_exported()
    shutil.rmtree(lab.source(swapped))
    lab.source(swapped).symlink_to(outside, target_is_directory=True)
    # exported, then pointed at another event's folder inside the system folder
    unexported = lab.add()
    aliased = lab.add_exported()
    shutil.rmtree(lab.source(aliased))
    lab.source(aliased).symlink_to(lab.source(unexported), target_is_directory=True)
    # a catalog row whose local_path climbs out ('..'), or names the system folder
    climbing = [lab.add_exported() for _ in range(3)]
    for record, bad_path in zip(
        climbing, ["../../outside", "../tsu-exp002", "Images/../.."], strict=True
    ):
        with lab.catalog.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE imaging_event SET local_path = :p WHERE ref_id = :r"),
                {"p": bad_path, "r": record.ref_id},
            )
    (lab.root / "tsu-exp002").mkdir(exist_ok=True)
    (lab.root / "tsu-exp002" / "keep.tif").write_bytes(b"k")
    # a folder holding a symlink out: the folder goes, the link with it, the target stays
    linking = lab.add()
    (lab.source(linking) / "escape").symlink_to(outside, target_is_directory=True)
    linking = lab.export(linking)  # the tar holds the link itself, not what it points at
    # a symlink named by an intermediate folder: resolves out of the data root
    via_parent = lab.add_exported(local_path="Elsewhere/x")
    real_parent = lab.source(via_parent).parent
    moved = tmp_path / "moved-images"
    shutil.move(real_parent, moved)
    real_parent.symlink_to(moved, target_is_directory=True)
    before = files_outside(tmp_path, lab.root)

    outcomes = lab.purge()

    for record in (swapped, aliased, via_parent, *climbing):
        outcome = outcomes[record.ref_id]
        assert outcome.why is None and outcome.skip is not None, outcome
        assert outcome.skip.reason == UNSAFE_SOURCE, outcome.skip
        assert lab.get(record.ref_id).status == EventStatus.VERIFIED
    assert outcomes[linking.ref_id].why == Why.LIFESPAN and not lab.source(linking).exists()
    assert (outside / "precious.tif").read_bytes() == b"p" * 100
    assert lab.source(unexported).is_dir() and (lab.root / "tsu-exp002" / "keep.tif").exists()
    assert prince.is_dir()
    assert files_outside(tmp_path, lab.root) == before


def test_a_folder_changed_after_its_export_is_kept(lab) -> None:
    record = lab.add_exported()
    (lab.source(record) / "late.tif").write_bytes(b"written after the export")

    outcome = lab.purge()[record.ref_id]

    assert outcome.skip is not None and outcome.skip.reason == CHANGED_LOCALLY
    assert (lab.source(record) / "late.tif").exists()
    assert lab.get(record.ref_id).status == EventStatus.VERIFIED


def test_a_source_already_gone_is_skipped_without_a_head(lab) -> None:
    record = lab.add_exported()
    shutil.rmtree(lab.source(record))
    outcome = lab.purge()[record.ref_id]
    assert outcome.skip is not None and outcome.skip.reason == SOURCE_MISSING


def test_disk_pressure_purges_the_oldest_verified_events_first(lab) -> None:
    ages = [timedelta(hours=h) for h in (1, 4, 2, 3)]
    records = [lab.add_exported(age=age, files={"x.tif": b"x" * 10_000}) for age in ages]
    unverified = lab.add(age=timedelta(hours=5))
    # 15 kB short of the 50 % asked for: two 10 kB folders (the two oldest) are enough
    disk = DiskLevel(total=1_000_000, free=485_000)
    policy = PurgePolicy(frozenset({"prince"}), LIFESPAN, min_free_percent=50)

    outcomes = lab.purge(disk, policy=policy)

    oldest_two = {records[1].ref_id, records[3].ref_id}
    assert {ref for ref, o in outcomes.items() if o.why == Why.DISK_PRESSURE} == oldest_two
    assert all(lab.source(r).exists() == (r.ref_id not in oldest_two) for r in records)
    assert outcomes[unverified.ref_id].skip is not None and lab.source(unverified).exists()


def test_disk_pressure_reads_the_real_filesystem(lab, dagster_instance) -> None:
    young = lab.add_exported(age=YOUNG)
    assert run_purge_job(lab, dagster_instance).success and lab.source(young).exists()

    # 100 % free is never met on a real disk: every verified event of prince goes.
    result = run_purge_job(lab, dagster_instance, purge_min_free=100)

    assert result.success and not lab.source(young).exists()
    assert run_metadata(result)["deleted"].records[0].data["why"] == Why.DISK_PRESSURE


def test_a_stale_purge_claim_is_taken_over_but_a_live_one_is_respected(lab) -> None:
    record = lab.add_exported()
    assert lab.catalog.claim_for_purge([record], "crashed-purge-run") == {record.ref_id}
    held = lab.get(record.ref_id)
    assert held.status == EventStatus.PURGING

    alive = lab.purge(run_is_alive=lambda run_id: run_id == "crashed-purge-run")
    assert alive[record.ref_id].skip.reason == HELD and lab.source(record).exists()

    # A run that died after deleting leaves a hold on a folder that is gone: it ends too.
    deleted = lab.add_exported()
    assert lab.catalog.claim_for_purge([deleted], "crashed-purge-run") == {deleted.ref_id}
    shutil.rmtree(lab.source(deleted))

    taken = lab.purge(run_is_alive=lambda _run_id: False)
    assert taken[record.ref_id].why == Why.LIFESPAN and not lab.source(record).exists()
    assert lab.get(record.ref_id).status == EventStatus.VERIFIED
    assert taken[deleted.ref_id].skip.reason == SOURCE_MISSING
    assert lab.get(deleted.ref_id).status == EventStatus.VERIFIED


# --- an export and a purge at the same time on the same event --------------------------------


def test_a_purge_skips_an_event_that_an_export_has_claimed(lab) -> None:
    record = lab.add_exported()
    # A forced re-export has claimed it and is uploading.
    assert lab.catalog.claim(record.ref_id, "reexport", force=True, run_is_alive=lambda _: True)

    outcome = lab.purge()[record.ref_id]

    assert outcome.why is None and lab.source(record).exists()
    assert outcome.skip is not None and outcome.skip.reason == NOT_VERIFIED
    assert lab.get(record.ref_id).status == EventStatus.EXPORTING


@pytest.mark.parametrize("meanwhile", ["claimed", "verified anew"])
def test_a_purge_skips_an_event_an_export_took_after_the_purge_read_it(lab, meanwhile) -> None:
    snapshot = lab.add_exported()  # what the purge read
    assert lab.catalog.claim(snapshot.ref_id, "reexport", force=True, run_is_alive=lambda _: True)
    if meanwhile == "verified anew":  # the re-export finished with other bytes
        assert lab.catalog.mark_verified(snapshot.ref_id, "reexport", size=1, sha256="e" * 64)

    (outcome,) = lab.purger().purge([snapshot], Why.LIFESPAN)

    assert outcome.skip is not None and outcome.skip.reason == HELD, outcome
    assert lab.source(snapshot).exists()
    assert lab.get(snapshot.ref_id).status != EventStatus.PURGING


def test_an_export_cannot_claim_an_event_a_purge_holds_or_has_purged(lab) -> None:
    record = lab.add_exported()
    assert lab.catalog.claim_for_purge([record], "purge-run") == {record.ref_id}
    refused = lab.exporter("reexport").export(lab.get(record.ref_id), force=True)
    assert not refused.exported and refused.error is None
    lab.catalog.finish_purges("purge-run", purged=[(record, 1, None)])
    assert lab.get(record.ref_id).purged_at is not None
    # The purge deleted the folder after the exporter looked: its claim is refused.
    assert not lab.catalog.claim(
        record.ref_id, "reexport", force=True, run_is_alive=lambda _: False
    )
    assert lab.get(record.ref_id).status == EventStatus.VERIFIED


def race(lab: Lab, record: EventRecord, export_delay: float) -> dict[str, Any]:
    """A forced re-export and a purge run of `record`, started together (the export
    `export_delay` seconds later, so that either may reach the catalog first)."""
    start = threading.Barrier(2)
    results: dict[str, Any] = {}

    def export() -> None:
        start.wait(10)
        time.sleep(export_delay)
        results["export"] = lab.exporter("reexport").export(record, force=True)

    def purge() -> None:
        start.wait(10)
        results["purge"] = lab.purge()[record.ref_id]

    threads = [threading.Thread(target=export), threading.Thread(target=purge)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(results) == {"export", "purge"}, results
    return results


def test_export_and_purge_racing_on_one_event_never_lose_data(lab) -> None:
    orders = Counter()
    for export_delay in (0, 0, 0.005, 0.01, 0.02, 0.05):
        record = lab.add_exported(files={"a.tif": os.urandom(4000)})
        original = {"./a.tif": (lab.source(record) / "a.tif").read_bytes()}

        results = race(lab, record, export_delay)
        orders["purge first" if results["purge"].why else "export first"] += 1

        final = lab.get(record.ref_id)
        assert final.status == EventStatus.VERIFIED, (final.status, final.last_error, results)
        assert results["export"].error is None, results
        if not lab.source(record).exists():
            # deleted: S3 holds exactly the bytes that were on disk, as the catalog says
            assert final.purged_at is not None and results["purge"].why is not None
            lab.store.verify_object(
                final.object_key, size=final.size, sha256=final.sha256, ref_id=final.ref_id
            )
            body = lab.store.client.get_object(Bucket=lab.store.bucket, Key=final.object_key)
            members = untar(body["Body"].read())
            assert {k: v for k, v in members.items() if k == "./a.tif"} == original
        else:
            assert final.purged_at is None and results["purge"].why is None
    print(f"export and purge racing: {dict(orders)}")


def test_the_purge_works_on_the_default_sqlite_catalog(object_store, streams, tmp_path) -> None:
    sqlite_catalog = Catalog(database_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    migrate(sqlite_catalog.database_url)
    root = tmp_path / "data"
    root.mkdir()
    lab = Lab(sqlite_catalog, object_store, streams, root)
    due, young, tampered = lab.add_exported(), lab.add_exported(age=YOUNG), lab.add_exported()
    lab.store.client.delete_object(Bucket=lab.store.bucket, Key=tampered.object_key)

    outcomes = lab.purge()

    assert outcomes[due.ref_id].why == Why.LIFESPAN and not lab.source(due).exists()
    assert lab.get(due.ref_id).purged_at is not None
    assert lab.get(due.ref_id).bytes_freed == outcomes[due.ref_id].bytes_freed > 0
    assert outcomes[young.ref_id].skip.reason == TOO_YOUNG and lab.source(young).exists()
    assert lab.get(tampered.ref_id).status == EventStatus.NEEDS_ATTENTION
    assert lab.source(tampered).exists()
