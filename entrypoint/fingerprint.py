"""Identity of a run: the settings that shape the result plus the identity of its inputs.

Hashing a 140 GB model on every start would cost minutes, so a large file's identity is its size and
a hash of its first and last MiB; small files (configs, tokenizers, datasets up to 64 MiB) are hashed
whole. That catches a replaced model or an edited dataset while keeping the skip path far under a
second.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

WHOLE_FILE_LIMIT = 64 * 1024 * 1024
SAMPLE = 1024 * 1024


def file_identity(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(fh.read(SAMPLE))
            fh.seek(size - SAMPLE)
            digest.update(fh.read(SAMPLE))
    return digest.hexdigest()


def tree_identity(root: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """Identity of every regular file below root (relative path -> identity), in a stable order."""
    skipped = set(skip)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skipped)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = Path(dirpath, name)
            out[str(full.relative_to(root))] = file_identity(full)
    return out


def digest(data: Mapping[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
