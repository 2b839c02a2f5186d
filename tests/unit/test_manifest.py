"""The manifest: what a local tree is compared with before the purge deletes it or a
re-export replaces its object (docs/design.md, "Custody")."""

from __future__ import annotations

import io
import os
from pathlib import Path

from dlm_pipelines.manifest import SECOND_NS, ManifestRecorder, compare, from_tar, scan
from dlm_pipelines.tar_stream import write_tar

META = {"ref_id": "x", "timestamp": "2026-01-02T03:04:05+00:00"}


def exported(source: Path):
    recorder, out = ManifestRecorder(), io.BytesIO()
    write_tar(source, META, out, recorder)
    return recorder.manifest(), out.getvalue()


def tree(tmp_path: Path) -> Path:
    source = tmp_path / "acq"
    (source / "sub").mkdir(parents=True)
    (source / "a.tif").write_bytes(os.urandom(5000))
    (source / "sub" / "b.tif").write_bytes(b"b")
    (source / "link").symlink_to("a.tif")
    return source


def test_an_unchanged_tree_equals_its_manifest_and_the_tar_agrees(tmp_path: Path) -> None:
    source = tree(tmp_path)
    manifest, data = exported(source)
    assert not compare(manifest, scan(source))
    assert not compare(manifest, scan(source, hash_files=True))
    from_disk = {m.path: m.sha256 for m in manifest.files()}
    back = from_tar(io.BytesIO(data))
    assert {m.path: m.sha256 for m in back.files()} == from_disk
    assert back.mtime_resolution_ns == SECOND_NS and not compare(back, scan(source))


def test_every_kind_of_change_is_named(tmp_path: Path) -> None:
    source = tree(tmp_path)
    manifest, _ = exported(source)
    stamp = os.lstat(source / "a.tif").st_mtime_ns
    late = source / "late.tif"
    late.write_bytes(b"late")
    os.utime(late, ns=(1, 1))  # an old mtime changes nothing
    (source / "sub" / "b.tif").unlink()
    with open(source / "a.tif", "r+b") as f:  # same size, same mtime, other bytes
        f.write(b"X")
    os.utime(source / "a.tif", ns=(stamp, stamp))
    (source / "link").unlink()
    (source / "link").symlink_to("sub")

    difference = compare(manifest, scan(source))
    assert difference.added == ["late.tif"] and difference.missing == ["sub/b.tif"]
    assert [c.split(":")[0] for c in difference.changed] == [".", "link", "sub"]  # dir mtimes
    content = compare(manifest, scan(source, hash_files=True))
    assert any(c.startswith("a.tif: content") for c in content.changed)
    superset = compare(manifest, scan(source), allow_added=True)
    assert superset.added == [] and superset.missing == ["sub/b.tif"]


def test_sha256sum_lines_escape_what_sha256sum_escapes(tmp_path: Path) -> None:
    source = tmp_path / "acq"
    source.mkdir()
    (source / "name with spaces.tif").write_bytes(b"s")
    (source / "back\\slash.tif").write_bytes(b"b")
    manifest, _ = exported(source)
    lines = manifest.sha256sum().splitlines()
    digest = {m.path: m.sha256 for m in manifest.files()}
    assert f"{digest['name with spaces.tif']}  name with spaces.tif" in lines
    slashed = "back\\slash.tif"
    assert "\\" + digest[slashed] + "  back\\\\slash.tif" in lines  # sha256sum's escape
