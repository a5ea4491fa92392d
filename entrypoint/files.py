"""Small files on NFS, one way each: fsync, atomic JSON writes, and the two ways of reading JSON.

- `read_json`: our own bookkeeping (markers, run records, locks, manifests). Absent, torn or not an object
  all read as None: a write that never finished did not happen.
- `load_json`: the user's files (model configs, adapter configs, tokenizers). Anything wrong is a
  ConfigError naming the file and what it was expected to be.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; rename is still atomic there
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file (or a directory's entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write, fsync, rename over `path`, fsync the directory: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object we wrote, or None when the file is absent or unreadable (a torn write counts as absent)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_json(path: Path, what: str) -> Any:
    """A user's JSON file; ConfigError naming `what` and the path when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None


def sizes_problem(directory: Path, record_name: str) -> str | None:
    """Why a directory recorded complete with its files' sizes (record_name, a JSON file with "files": {relative
    path: bytes}) is not so, or None when every recorded file is there with its size: a torn write, a truncated
    copy or a missing file shows."""
    record = read_json(directory / record_name)
    if record is None or not isinstance(record.get("files"), dict):
        return "it has no completion record"
    for name, size in record["files"].items():
        try:
            found = (directory / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if found != size:
            return f"{name} has {found} bytes, {size} were written"
    return None
