"""Property: whatever the mix of event states, S3 corruptions, local changes (files
added with old mtimes, removed, resized or re-timed behind the purge's back), clock
offsets and disk levels, the purge never deletes a source that is not verified and
matching in S3 and its manifest, and deletes every one that is eligible (real SeaweedFS
and PostgreSQL; one bucket reused).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dlm_pipelines.catalog import EventRecord, EventStatus, utcnow
from dlm_pipelines.purge_policy import DiskLevel, PurgePolicy
from tests.integration.test_purge import LIFESPAN, Lab

pytestmark = pytest.mark.integration
EXAMPLES = 200
DISK_TOTAL = 50_000  # bytes: of the order of a few events, so pressure is often partial
MISMATCHES = ("object missing", "other bytes", "wrong sha256 metadata", "size changed")
# Local changes a clock comparison misses: every one keeps the old mtimes where it can.
LOCAL_CHANGES = ("file added", "file removed", "file resized", "file re-timed")
STATES = ("received", "failed", "exporting", "verified", "needs_attention")
OLD_MTIME_NS = 1_600_000_000 * 10**9  # 2020


@dataclass
class Spec:
    system: str
    state: str
    corruption: str | None  # applies to verified events only
    age_hours: float
    size: int
    single_file: bool


specs = st.builds(
    Spec,
    # weighted towards what can be deleted, so that most examples delete something
    system=st.sampled_from(["prince", "prince", "tsu-exp002"]),
    state=st.sampled_from([*STATES, "verified", "verified", "verified"]),
    # a third tampered with, so that alarms are common rather than a rare corner
    corruption=st.one_of(st.none(), st.none(), st.sampled_from([*MISMATCHES, *LOCAL_CHANGES])),
    # either side of the 8 h lifespan (hypothesis's floats favour their bounds)
    age_hours=st.one_of(st.floats(0, 14), st.sampled_from([1.0, 6.0, 9.5, 12.0])),
    size=st.integers(500, 12_000),
    single_file=st.booleans(),
)


def make(lab: Lab, spec: Spec) -> EventRecord:
    """An event in the given state, made through the real export and catalog paths."""
    data = os.urandom(spec.size)
    half = spec.size // 2
    files = {"a.bin": data[:half], "sub/b.bin": data[half:]}
    kwargs = {"single_file": data} if spec.single_file else {"files": files}
    record = lab.add(system=spec.system, age=timedelta(hours=spec.age_hours), **kwargs)
    if spec.state == "received":
        return record
    if spec.state == "failed":
        assert lab.catalog.claim(record.ref_id, "x", force=False, run_is_alive=lambda _: False)
        lab.catalog.mark_failed(record.ref_id, "x", "upload failed")
        return lab.get(record.ref_id)
    record = lab.export(record)
    if spec.state == "exporting":  # a forced re-export is uploading right now
        assert lab.catalog.claim(record.ref_id, "live", force=True, run_is_alive=lambda _: True)
    elif spec.state == "needs_attention":
        assert lab.catalog.claim_for_purge([record], "earlier-purge") == {record.ref_id}
        lab.catalog.finish_purges("earlier-purge", alarms=[(record, "sha256 differed")])
    elif spec.corruption is not None:
        corrupt(lab, record, spec.corruption)
    return lab.get(record.ref_id)


def corrupt(lab: Lab, record: EventRecord, how: str) -> None:
    client, bucket, key = lab.store.client, lab.store.bucket, record.object_key
    assert key is not None and record.size is not None
    meta = {"ref-id": record.ref_id, "sha256": record.sha256 or ""}
    if how == "object missing":
        client.delete_object(Bucket=bucket, Key=key)
    elif how == "other bytes":  # same size, same ref-id, no sha256 of ours
        client.put_object(
            Bucket=bucket, Key=key, Body=os.urandom(record.size), Metadata={"ref-id": record.ref_id}
        )
    elif how == "wrong sha256 metadata":
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        client.put_object(Bucket=bucket, Key=key, Body=body, Metadata={**meta, "sha256": "f" * 64})
    elif how == "size changed":
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        client.put_object(Bucket=bucket, Key=key, Body=body + b"\0" * 512, Metadata=meta)
    else:
        change_locally(lab.source(record), how)


def change_locally(source: Path, how: str) -> None:
    """Change the exported tree on disk, restoring every mtime a change would bump."""
    target = source if source.is_file() else source / "sub" / "b.bin"
    folder = target.parent
    stamps = {p: os.lstat(p).st_mtime_ns for p in (target, folder)}
    if how == "file added" and source.is_file():  # a single file can only grow
        with open(target, "ab") as f:
            f.write(b"appended")
    elif how == "file added":  # e.g. `cp -p` of an old file, after the export
        late = folder / "late.bin"
        late.write_bytes(b"never exported")
        os.utime(late, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    elif how == "file removed":
        target.unlink()
    elif how == "file resized":
        os.truncate(target, max(0, target.stat().st_size - 1))
    elif how == "file re-timed":  # an older mtime: the bytes may have been replaced
        stamps[target] -= 3600 * 10**9
    for path, mtime_ns in stamps.items():
        if os.path.lexists(path):
            os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def lab_factory(catalog, object_store, streams, tmp_path):
    """A fresh data root and an empty catalog per example; the bucket is reused."""

    def new_lab() -> Lab:
        with catalog.engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE imaging_event CASCADE"))
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        return Lab(catalog, object_store, streams, root)

    return new_lab


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    events=st.lists(specs, min_size=2, max_size=7),
    clock_offset_hours=st.floats(-3, 3),
    free_percent=st.floats(0, 100),
    min_free_percent=st.sampled_from([0, 10, 50, 90]),
    dry_run=st.booleans(),
)
def test_only_eligible_sources_are_deleted_and_all_of_them_are(
    lab_factory,
    events: list[Spec],
    clock_offset_hours: float,
    free_percent: float,
    min_free_percent: float,
    dry_run: bool,
) -> None:
    lab = lab_factory()
    try:
        check_one_mix(lab, events, clock_offset_hours, free_percent, min_free_percent, dry_run)
    finally:
        shutil.rmtree(lab.root, ignore_errors=True)


def check_one_mix(
    lab: Lab,
    events: list[Spec],
    clock_offset_hours: float,
    free_percent: float,
    min_free_percent: float,
    dry_run: bool,
) -> None:
    made = [(spec, make(lab, spec)) for spec in events]
    before = {r.ref_id: lab.get(r.ref_id).model_dump() for _, r in made}
    present = [r for _, r in made if os.path.lexists(lab.source(r))]  # a removed single file
    now = utcnow() + timedelta(hours=clock_offset_hours)
    disk = DiskLevel(total=DISK_TOTAL, free=int(DISK_TOTAL * free_percent / 100))
    policy = PurgePolicy(frozenset({"prince"}), LIFESPAN, min_free_percent)

    outcomes = lab.purger(policy, dry_run=dry_run).run(now, disk)

    reported = {o.record.ref_id for o in outcomes if o.why is not None}
    gone = {r.ref_id for r in present if not lab.source(r).exists()}
    deleted = reported if dry_run else gone
    if dry_run:
        assert gone == set()
        assert {r.ref_id: lab.get(r.ref_id).model_dump() for _, r in made} == before
    else:
        assert gone == reported

    # An independent oracle of what is eligible, from the specs alone.
    eligible = {
        r.ref_id: spec.size
        for spec, r in made
        if spec.system == "prince" and spec.state == "verified" and spec.corruption is None
    }
    # The one rule: nothing else is ever deleted.
    assert deleted <= set(eligible), deleted - set(eligible)

    records = {r.ref_id: r for _, r in made}
    due = {ref for ref in eligible if due_now(records[ref], now)}
    assert due <= deleted, due - deleted

    # Disk pressure: the oldest young eligible events, as few as cover the shortfall.
    young = sorted(
        (r for _, r in made if r.ref_id in eligible and r.ref_id not in due),
        key=lambda r: (r.received_at, r.timestamp, r.ref_id),
    )
    wanted = math.ceil(DISK_TOTAL * min_free_percent / 100) - disk.free
    short = wanted - sum(eligible[ref] for ref in due)
    taken = [r for r in young if r.ref_id in deleted]
    assert taken == young[: len(taken)], "not oldest first"
    freed = sum(eligible[r.ref_id] for r in taken)
    event(f"deleted: {'some' if deleted else 'none'}; under pressure: {len(taken)} of {len(young)}")
    if short <= 0:
        assert taken == []
    else:
        assert freed >= short or len(taken) == len(young)
        assert sum(eligible[r.ref_id] for r in taken[:-1]) < short, "more than needed"

    # The catalog tells the same story; mismatches seen by a HEAD are alarms.
    by_ref = {o.record.ref_id: o for o in outcomes}  # other systems are only counted
    for spec, r in made:
        final = lab.get(r.ref_id)
        outcome = by_ref.get(r.ref_id)
        if not dry_run and r.ref_id in deleted:
            assert final.purged_at is not None and final.bytes_freed == spec.size
            assert final.status == EventStatus.VERIFIED
        elif not dry_run:
            assert final.purged_at is None
        mismatched = spec.state == "verified" and spec.corruption in MISMATCHES
        if outcome is not None and outcome.alarm is not None:
            event("an alarm")
            assert mismatched, outcome
            expected = EventStatus.VERIFIED if dry_run else EventStatus.NEEDS_ATTENTION
            assert final.status == expected
        elif mismatched and spec.system == "prince" and due_now(r, now):
            pytest.fail(f"a due mismatch raised no alarm: {outcome}")


def due_now(record: EventRecord, now: datetime) -> bool:
    return record.received_at + LIFESPAN <= now
