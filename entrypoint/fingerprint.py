"""Identity of a run: the settings that shape the result plus the identity of its inputs.

Hashing a 140 GB model on every start would cost minutes, so a large file's identity is its size and
a hash of its first and last MiB; small files (configs, tokenizers, datasets up to 64 MiB) are hashed
whole. That catches a replaced model or an edited dataset while keeping the skip path far under a
second.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
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


def digest(data: Mapping[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
