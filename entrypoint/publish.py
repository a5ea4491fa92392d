"""Atomic publishing of a model directory behind a fixed path that readers (vLLM) open.

    /storage/models/merged-model            -> merged-model.versions/v0003-<fp>   (relative symlink)
    /storage/models/merged-model.versions/
        v0002-<fp>/   v0003-<fp>/           complete versions (a version exists only once renamed)
        .tmp-<id>/                          work in progress, never visible at the fixed path

A version directory appears by rename from its temporary directory, after every file in it was
fsynced, and the fixed path switches to it by renaming a new symlink over the old one. A reader sees
the old model or the new one, never a partial one; a kill at any moment leaves the old one published.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError
from entrypoint.files import atomic_write_json, fsync_dir, read_json

VERSION_RE = re.compile(r"^v(\d{4,})-([0-9a-f]{12}|legacy-\d{8}-\d{6})$")
MANIFEST = ".merge.json"  # inside each version: what it was made from
ROLLBACKS = "rolled-back.json"  # in <path>.versions: versions rolled back from, by fingerprint


@dataclass(frozen=True)
class Published:
    path: Path  # the fixed path (MERGED_MODEL_PATH)
    versions: Path  # <path>.versions

    @classmethod
    def at(cls, path: Path) -> Published:
        return cls(path, path.with_name(path.name + ".versions"))

    def current(self) -> Path | None:
        """The version the fixed path points at; refuses anything this scheme did not make."""
        path = self.path
        if path.is_symlink():
            target = Path(os.path.normpath(path.parent / os.readlink(path)))
            if target.parent != self.versions or not VERSION_RE.match(target.name):
                raise ConfigError(
                    f"MERGED_MODEL_PATH={str(path)!r} is a symlink to {os.readlink(path)!r}, outside "
                    f"{self.versions}: not published by this tool; refusing to touch it (remove or rename it)"
                )
            return target if target.is_dir() else None
        if path.exists() and not path.is_dir():
            raise ConfigError(f"MERGED_MODEL_PATH={str(path)!r} is a file, not a model directory; "
                              "refusing to touch it")
        return None

    def is_legacy_directory(self) -> bool:
        """A real directory at the fixed path: the older layout, written in place."""
        return self.path.is_dir() and not self.path.is_symlink()

    def manifest(self, version: Path | None) -> dict[str, Any] | None:
        return None if version is None else read_json(version / MANIFEST)

    def serves(self, fingerprint: str) -> bool:
        """The fixed path points at a version made from inputs with this fingerprint."""
        return (self.manifest(self.current()) or {}).get("fingerprint") == fingerprint

    def versions_sorted(self) -> list[Path]:
        if not self.versions.is_dir():
            return []
        found = [p for p in self.versions.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(found, key=lambda p: int(VERSION_RE.match(p.name).group(1)))  # type: ignore[union-attr]

    def next_number(self) -> int:
        existing = self.versions_sorted()
        return int(VERSION_RE.match(existing[-1].name).group(1)) + 1 if existing else 1  # type: ignore[union-attr]

    def new_workdir(self) -> Path:
        self.versions.mkdir(parents=True, exist_ok=True)
        work = self.versions / f".tmp-{uuid.uuid4().hex[:12]}"
        work.mkdir()
        return work

    def remove_stale_workdirs(self) -> list[Path]:
        """Work left by killed runs; only called while holding the publish lock."""
        removed = []
        if self.versions.is_dir():
            for path in self.versions.iterdir():
                if path.name.startswith(".tmp-"):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def migrate_legacy(self) -> Path:
        """Move a real directory at the fixed path into the versioned scheme, keeping the path readable:
        the symlink to its new place is prepared first, so the path is missing only between two renames."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.versions.mkdir(parents=True, exist_ok=True)
        target = self.versions / f"v{0:04d}-legacy-{stamp}"
        link = self._prepare_link(target)
        os.rename(self.path, target)
        os.replace(link, self.path)
        fsync_dir(self.versions)
        fsync_dir(self.path.parent)
        return target

    def _prepare_link(self, target: Path) -> Path:
        link = self.path.with_name(f".{self.path.name}.link-{uuid.uuid4().hex[:8]}")
        os.symlink(os.path.relpath(target, self.path.parent), link)
        return link

    def publish(self, workdir: Path, fingerprint: str, manifest: dict[str, Any]) -> Path:
        """Turn a finished work directory into the next version and point the fixed path at it."""
        atomic_write_json(workdir / MANIFEST, {**manifest, "fingerprint": fingerprint})
        version = self.versions / f"v{self.next_number():04d}-{fingerprint[:12]}"
        os.rename(workdir, version)
        fsync_dir(self.versions)
        link = self._prepare_link(version)
        os.replace(link, self.path)  # the atomic switch readers see
        fsync_dir(self.path.parent)
        return version

    def switch(self, version: Path) -> None:
        """Point the fixed path at an existing version (a rollback): the same atomic rename as publish."""
        link = self._prepare_link(version)
        os.replace(link, self.path)
        fsync_dir(self.path.parent)

    def rollback_target(self, current: Path | None) -> Path | None:
        """Where `rollback` without --to goes: the newest complete version older than the current one."""
        if current is None or not VERSION_RE.match(current.name):
            return None
        number = int(VERSION_RE.match(current.name).group(1))  # type: ignore[union-attr]
        older = [v for v in self.versions_sorted() if int(VERSION_RE.match(v.name).group(1)) < number]  # type: ignore[union-attr]
        return older[-1] if older else None

    def find(self, name: str) -> Path | None:
        """A version by its name, or by its number alone (v0003)."""
        for version in self.versions_sorted():
            if version.name == name or version.name.split("-", 1)[0] == name:
                return version
        return None

    def rollbacks(self) -> dict[str, Any]:
        return read_json(self.versions / ROLLBACKS) or {}

    def record_rollback(self, left: Path, target: Path) -> None:
        """Remember the fingerprint rolled back from (a merge of the same inputs will not publish it again
        unnoticed) and forget the target's (rolling forward to a version lifts its record)."""
        records = self.rollbacks()
        left_fp = (self.manifest(left) or {}).get("fingerprint")
        target_fp = (self.manifest(target) or {}).get("fingerprint")
        if left_fp:
            records[left_fp] = {"version": left.name, "rolled_back_to": target.name, "at": time.time()}
        records.pop(target_fp, None)
        atomic_write_json(self.versions / ROLLBACKS, records)

    def prune(self, keep: int) -> list[Path]:
        """Delete the oldest versions made here beyond `keep`. The current one and the rollback target (the
        newest older one) always stay, whatever `keep` says. A migrated legacy directory is the user's: it is
        never deleted."""
        current = self.current()
        protected = {current, self.rollback_target(current)}
        ours = [v for v in self.versions_sorted() if "legacy" not in v.name and v not in protected]
        removed = []
        excess = len(ours) + sum(1 for v in protected if v is not None) - keep
        for version in ours[:max(0, excess)]:
            shutil.rmtree(version)
            removed.append(version)
        return removed


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_free_space(where: Path, needed: int) -> None:
    """Refuse before writing when the filesystem cannot hold another copy of the model."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = 64 * 1024 * 1024
    if free < needed + margin:
        raise ConfigError(
            f"not enough free space on {probe}: the merged model needs {human_size(needed)} (+64 MiB margin), "
            f"{human_size(free)} are free; free space or lower MERGE_KEEP_VERSIONS"
        )


def human_size(count: int) -> str:
    """Bytes in the largest binary unit that keeps a figure of at least 1 (MiB under a GiB: a small disk
    does not read as 0.00 GiB)."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} bytes"


@contextlib.contextmanager
def cleanup_on_failure(workdir: Path):
    """Remove the work directory of a merge that failed, and the versions directory when it is left empty."""
    try:
        yield
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            workdir.parent.rmdir()  # only when empty: a first merge that failed leaves nothing behind
        raise
