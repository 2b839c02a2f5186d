"""An event's manifest: every member of its tar as it was read from disk (docs/design.md,
"Custody").

Recorded by the export in the same single read that makes the tar: relative path,
type, size, mtime in nanoseconds, the sha256 of each regular file, a symlink's
target. The purge trusts only this: the local tree must equal it exactly (names,
types, sizes, mtimes; no clock comparison). A re-export may replace the object only
if the tree holds everything it lists. Users get it as JSON or as `sha256sum -c`
input. Events exported before manifests existed get one read back from their tar
(`dlm backfill-manifests`); a tar keeps whole-second mtimes only, which such a
manifest says with `mtime_resolution_ns`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

FILE, DIR, SYMLINK, HARDLINK, OTHER = "file", "dir", "symlink", "hardlink", "other"
ROOT = "."  # a folder source's own entry
SECOND_NS = 1_000_000_000
HASH_CHUNK = 1 << 20
METADATA_MEMBER = "./metadata.json"  # the tar's last member, DLM's own (docs/contracts.md §3)


@dataclass(frozen=True, slots=True)
class Member:
    path: str  # relative to the tar's root: "." and "a/b" for a folder, the name for a file
    type: str  # file | dir | symlink | hardlink | other
    size: int = 0  # bytes of a file (of the linked file for a hardlink); 0 otherwise
    mtime_ns: int = 0
    sha256: str | None = None  # files and hardlinks
    target: str | None = None  # a symlink's target; a hardlink's member path

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "type": self.type,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
        }
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        if self.target is not None:
            out["target"] = self.target
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Member:
        return cls(
            path=data["path"],
            type=data["type"],
            size=data.get("size", 0),
            mtime_ns=data.get("mtime_ns", 0),
            sha256=data.get("sha256"),
            target=data.get("target"),
        )

    @property
    def kind(self) -> str:
        """The type as a tree walk sees it: a hardlink is a file there."""
        return FILE if self.type == HARDLINK else self.type


@dataclass(frozen=True)
class Manifest:
    members: tuple[Member, ...]
    # 1: read from disk at export; SECOND_NS: read back from a tar (whole seconds)
    mtime_resolution_ns: int = 1

    def as_json(self) -> list[dict[str, Any]]:
        return [m.as_json() for m in self.members]

    @classmethod
    def from_json(cls, members: Iterable[dict[str, Any]], mtime_resolution_ns: int = 1) -> Manifest:
        return cls(tuple(Member.from_json(m) for m in members), mtime_resolution_ns)

    def files(self) -> list[Member]:
        return [m for m in self.members if m.kind == FILE]

    def sha256sum(self) -> str:
        """`sha256sum -c` input for the extracted tar, run from the folder it was
        extracted into. Names with a newline or backslash use sha256sum's escape."""
        lines = []
        for member in self.files():
            name = member.path
            if "\\" in name or "\n" in name:
                escaped = name.replace("\\", "\\\\").replace("\n", "\\n")
                lines.append(f"\\{member.sha256}  {escaped}\n")
            else:
                lines.append(f"{member.sha256}  {name}\n")
        return "".join(lines)


@dataclass(frozen=True)
class Difference:
    """How a local tree differs from a manifest; empty when they are equal."""

    added: list[str] = field(default_factory=list)  # on disk, not in the manifest
    missing: list[str] = field(default_factory=list)  # in the manifest, not on disk
    changed: list[str] = field(default_factory=list)  # "path: what" for both

    def __bool__(self) -> bool:
        return bool(self.added or self.missing or self.changed)

    def describe(self, limit: int = 20) -> str:
        parts = []
        for label, names in (("added", self.added), ("missing", self.missing)):
            if names:
                shown = ", ".join(names[:limit]) + (" …" if len(names) > limit else "")
                parts.append(f"{len(names)} {label} ({shown})")
        if self.changed:
            shown = "; ".join(self.changed[:limit]) + (" …" if len(self.changed) > limit else "")
            parts.append(f"{len(self.changed)} changed ({shown})")
        return ", ".join(parts) or "no difference"


def _changes(recorded: Member, local: Member, resolution: int, *, dir_mtimes: bool) -> str | None:
    if recorded.kind != local.kind:
        return f"{recorded.kind} became {local.kind}"
    if recorded.kind == FILE and recorded.size != local.size:
        return f"size {recorded.size} → {local.size}"
    if recorded.kind == SYMLINK and recorded.target != local.target:
        return f"target {recorded.target!r} → {local.target!r}"
    if (recorded.kind != DIR or dir_mtimes) and (
        recorded.mtime_ns // resolution != local.mtime_ns // resolution
    ):
        return f"mtime_ns {recorded.mtime_ns} → {local.mtime_ns}"
    if recorded.sha256 and local.sha256 and recorded.sha256 != local.sha256:
        return "content (sha256) differs"
    return None


def compare(recorded: Manifest, local: Manifest, *, allow_added: bool = False) -> Difference:
    """The difference between a recorded manifest and a scan of the local tree.

    `allow_added`: a superset is fine (files added after the export), and folders may
    then carry new mtimes; what the manifest lists must still be there unchanged.
    """
    here = {m.path: m for m in local.members}
    listed = {m.path: m for m in recorded.members}
    resolution = recorded.mtime_resolution_ns
    added = [] if allow_added else sorted(set(here) - set(listed))
    missing = sorted(set(listed) - set(here))
    changed = []
    for path in sorted(set(listed) & set(here)):
        what = _changes(listed[path], here[path], resolution, dir_mtimes=not allow_added)
        if what is not None:
            changed.append(f"{path}: {what}")
    return Difference(added, missing, changed)


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _member(path: str, entry: os.stat_result, disk_path: str, *, hash_files: bool) -> Member:
    mode = entry.st_mode
    if stat.S_ISREG(mode):
        digest = file_sha256(disk_path) if hash_files else None
        return Member(path, FILE, entry.st_size, entry.st_mtime_ns, digest)
    if stat.S_ISDIR(mode):
        return Member(path, DIR, 0, entry.st_mtime_ns)
    if stat.S_ISLNK(mode):
        return Member(path, SYMLINK, 0, entry.st_mtime_ns, target=os.readlink(disk_path))
    return Member(path, OTHER, 0, entry.st_mtime_ns)


def scan(source: Path, *, hash_files: bool = False) -> Manifest:
    """The local tree as a manifest (lstat only: symlinks are never followed).

    Paths as the export names them; with `hash_files`, every file is read and hashed.
    """
    top = os.lstat(source)
    if not stat.S_ISDIR(top.st_mode):
        return Manifest((_member(source.name, top, str(source), hash_files=hash_files),))
    members = [_member(ROOT, top, str(source), hash_files=hash_files)]

    def walk(folder: str, prefix: str) -> Iterator[Member]:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                relative = f"{prefix}{entry.name}"
                info = entry.stat(follow_symlinks=False)
                yield _member(relative, info, entry.path, hash_files=hash_files)
                if stat.S_ISDIR(info.st_mode):
                    yield from walk(entry.path, f"{relative}/")

    members.extend(walk(str(source), ""))
    return Manifest(tuple(members))


def member_path(tar_name: str) -> str:
    """A tar member's name as a manifest path ("./a/b" → "a/b", "." stays)."""
    return tar_name[2:] if tar_name.startswith("./") else tar_name


class _HashingReader:
    """A source file for `tarfile` that hashes what is read from it, as it is read."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.name = getattr(raw, "name", None)
        self.digest = hashlib.sha256()

    def readinto(self, buffer: Any) -> int:
        got: int = self.raw.readinto(buffer)
        if got:
            self.digest.update(memoryview(buffer)[:got])
        return got

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.raw.read(size)
        self.digest.update(data)
        return data

    def fileno(self) -> int:
        return int(self.raw.fileno())


class ManifestRecorder:
    """Fed by the tar writer: the stat of each member as it is added, and the reader
    through which its bytes go into the tar (docs/design.md, "Custody")."""

    def __init__(self) -> None:
        self._members: list[Member] = []
        self._stats: dict[str, os.stat_result] = {}
        self._file_sha256: dict[str, str] = {}

    def stat(self, disk_path: str, tar_name: str) -> None:
        """Called with the lstat that `tarfile` is about to describe."""
        self._stats[tar_name] = os.lstat(disk_path)

    def reader(self, info: tarfile.TarInfo, fileobj: IO[bytes] | None) -> Any:
        if fileobj is None or info.name not in self._stats:
            return fileobj
        return _HashingReader(fileobj)

    def added(self, info: tarfile.TarInfo, reader: Any) -> None:
        """The member is in the tar (its data too); record it."""
        before = self._stats.pop(info.name, None)
        if before is None:
            return  # not from the source (metadata.json)
        path = member_path(info.name)
        if isinstance(reader, _HashingReader):
            after = os.fstat(reader.fileno())
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise OSError(f"{reader.name} changed while it was being archived")
            digest = reader.digest.hexdigest()
            self._file_sha256[path] = digest
            member = Member(path, FILE, before.st_size, before.st_mtime_ns, digest)
        elif info.islnk():
            target = member_path(info.linkname)
            member = Member(
                path,
                HARDLINK,
                before.st_size,
                before.st_mtime_ns,
                self._file_sha256.get(target),
                target,
            )
        elif info.issym():
            member = Member(path, SYMLINK, 0, before.st_mtime_ns, target=info.linkname)
        elif info.isdir():
            member = Member(path, DIR, 0, before.st_mtime_ns)
        else:
            member = Member(path, OTHER, 0, before.st_mtime_ns)
        self._members.append(member)

    def manifest(self) -> Manifest:
        return Manifest(tuple(self._members))


def from_tar(stream: IO[bytes]) -> Manifest:
    """The manifest of an exported tar, read as a stream (no local data needed).

    The last member, DLM's `./metadata.json`, is not part of the source. Mtimes are
    whole seconds there, so the manifest's resolution is one second.
    """
    members: list[Member] = []
    file_sha256: dict[str, str] = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            path = member_path(info.name)
            mtime_ns = int(info.mtime) * SECOND_NS
            if info.isreg():
                digest = hashlib.sha256()
                data = tar.extractfile(info)
                assert data is not None
                for chunk in iter(lambda: data.read(HASH_CHUNK), b""):  # noqa: B023
                    digest.update(chunk)
                file_sha256[path] = digest.hexdigest()
                members.append(Member(path, FILE, info.size, mtime_ns, file_sha256[path]))
            elif info.islnk():
                target = member_path(info.linkname)
                linked = next((m for m in members if m.path == target), None)
                size = linked.size if linked else 0
                members.append(
                    Member(path, HARDLINK, size, mtime_ns, file_sha256.get(target), target)
                )
            elif info.issym():
                members.append(Member(path, SYMLINK, 0, mtime_ns, target=info.linkname))
            elif info.isdir():
                members.append(Member(path, DIR, 0, mtime_ns))
            else:
                members.append(Member(path, OTHER, 0, mtime_ns))
    if not members or members[-1].path != member_path(METADATA_MEMBER):
        raise ValueError("not a DLM export: the last member is not ./metadata.json")
    return Manifest(tuple(members[:-1]), SECOND_NS)
