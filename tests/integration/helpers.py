"""Test helpers: imaging events in the legacy wire format, and their source folders."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from tests.conftest import load_fixture

STITCH = load_fixture("imaging_event_stitch.json")


def make_event(
    data_root: Path,
    *,
    system: str = "prince",
    experiment_id: str = "exp-a",
    timestamp: datetime | None = None,
    files: dict[str, bytes] | None = None,
    local_path: str | None = None,
    event_type: str = "stitch",
    write: bool = True,
) -> dict[str, str]:
    """Stream fields exactly as the acquisition software writes them; the folder first."""
    ref_id = str(uuid.uuid4())
    local_path = local_path or f"Images/{ref_id[:8]}"
    if write:
        folder = data_root / system / local_path
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in (files or {"Img_r01_c01.tif": os.urandom(2048)}).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content)
    ts = timestamp or datetime.now(UTC)
    return {
        **STITCH,
        "ref_id": ref_id,
        "experiment_id": experiment_id,
        "timestamp": ts.isoformat().replace("+00:00", "Z"),
        "type": event_type,
        "system": system,
        "local_path": local_path,
        "img_count": str(len(files or {"x": b""})),
    }


def untar(data: bytes) -> dict[str, bytes | None]:
    """Member name → content (None for directories)."""
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member) if member.isfile() else None
            out[member.name] = f.read() if f else None
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {
        "./" + str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
