"""How the merge reports its progress: a bar per shard in a terminal, one log line per shard in a pod."""

from __future__ import annotations

import logging
import sys
from typing import Any

from entrypoint.lora_merge import MergeProgress

log = logging.getLogger("entrypoint")


class ShardProgress:
    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, p: MergeProgress) -> None:
        if not sys.stderr.isatty():
            log.info("merged shard %d/%d %s (%.0f%% of the weights)", p.shard_index, p.shard_count, p.shard_name,
                     100.0 * p.bytes_done / max(1, p.bytes_total))
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=p.shard_count, unit="shard", desc="merge", file=sys.stderr)
        self._bar.set_postfix_str(p.shard_name)
        self._bar.update(1)
        if p.shard_index == p.shard_count:
            self._bar.close()
