"""The tar layout of docs/contracts.md §3."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from dlm_pipelines.tar_stream import estimate_tar_size, part_size_for, write_tar

META = {"ref_id": "x", "timestamp": "2026-01-02T03:04:05.678000+00:00", "schema_version": "1a1"}


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


def test_folder_source_members_then_metadata_last(tmp_path: Path) -> None:
    source = tmp_path / "acq"
    (source / "sub").mkdir(parents=True)
    (source / "b.tif").write_bytes(b"B" * 1000)
    (source / "sub" / "a.tif").write_bytes(b"A" * 10)
    out = io.BytesIO()
    write_tar(source, META, out)
    members = _members(out.getvalue())
    assert [m.name for m in members] == [".", "./b.tif", "./sub", "./sub/a.tif", "./metadata.json"]
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        doc = tar.extractfile("./metadata.json").read().decode()  # type: ignore[union-attr]
        assert tar.extractfile("./sub/a.tif").read() == b"A" * 10  # type: ignore[union-attr]
    assert json.loads(doc) == META
    assert doc.startswith('{\n    "ref_id"')  # 4-space indent
    assert len(out.getvalue()) % 10240 == 0  # whole tar records, uncompressed


def test_single_file_source(tmp_path: Path) -> None:
    source = tmp_path / "frame.tif"
    source.write_bytes(b"F" * 3)
    out = io.BytesIO()
    write_tar(source, META, out)
    assert [m.name for m in _members(out.getvalue())] == ["frame.tif", "./metadata.json"]


def test_symlinks_are_stored_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    source = tmp_path / "acq"
    source.mkdir()
    (source / "link").symlink_to(outside)
    out = io.BytesIO()
    write_tar(source, META, out)
    link = next(m for m in _members(out.getvalue()) if m.name == "./link")
    assert link.issym() and b"secret\n" not in out.getvalue().split(b"metadata.json")[0][-10:]


def test_part_size_grows_to_stay_under_the_part_limit() -> None:
    mib = 1 << 20
    assert part_size_for(100 * mib, 16 * mib) == 16 * mib
    big = 500 * 1024 * mib  # 500 GiB
    assert part_size_for(big, 16 * mib) * 9000 >= big


def test_estimate_is_close(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"f{i}").write_bytes(b"x" * 5000)
    out = io.BytesIO()
    write_tar(tmp_path, META, out)
    assert abs(estimate_tar_size(tmp_path) - len(out.getvalue())) < 20_000


def test_whole_second_mtimes_and_pax_headers_only_where_needed(tmp_path: Path) -> None:
    source = tmp_path / "acq"
    source.mkdir()
    tile = source / "tile.tif"
    tile.write_bytes(b"T" * 100)
    os.utime(tile, (1_764_000_000.75, 1_764_000_000.75))
    long_name = "x" * 150 + ".tif"  # over ustar's 100 characters: needs a PAX path
    (source / long_name).write_bytes(b"L")
    out = io.BytesIO()
    write_tar(source, META, out)
    members = {m.name: m for m in _members(out.getvalue())}
    assert members["./tile.tif"].mtime == 1_764_000_000
    assert members["./tile.tif"].pax_headers == {}
    assert members[f"./{long_name}"].pax_headers == {"path": f"./{long_name}"}


def test_same_tree_and_event_give_the_same_bytes(tmp_path: Path) -> None:
    """docs/design.md "Custody": a re-export of an unchanged tree reproduces its sha256."""
    source = tmp_path / "acq"
    (source / "sub").mkdir(parents=True)
    (source / "a.tif").write_bytes(os.urandom(3000))
    (source / "sub" / "b.tif").write_bytes(b"B")
    (source / "link").symlink_to("a.tif")
    first, second = io.BytesIO(), io.BytesIO()
    write_tar(source, META, first)
    write_tar(source, META, second)
    assert first.getvalue() == second.getvalue()
    metadata = {m.name: m for m in _members(first.getvalue())}["./metadata.json"]
    assert metadata.mtime == 1_767_323_045  # the event's timestamp, whole seconds
    assert (metadata.uid, metadata.gid, metadata.uname, metadata.gname) == (0, 0, "", "")
