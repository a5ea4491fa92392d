"""How much more memory this container may take before the kernel kills it.

A process that crosses its container's memory limit is killed (exit 137, OOMKilled), and the Job's retry
starts over: for the merge that means the whole merge again, then the same kill. Whatever loads a model whole
asks here first. Read from the container's own cgroup (v2 `memory.max`, or v1 `memory.limit_in_bytes`, as
Kubernetes sets them from `resources.limits.memory`) and from the node's `MemAvailable`, whichever is lower.

Page cache the container's files occupy counts in its cgroup's usage, but the kernel reclaims it before it
kills anything: `used` leaves out the active and inactive file pages (what a merge just wrote is most of
them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")
SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned 64-bit value; anything above 2**60 bytes is none.
NO_LIMIT = 1 << 60


@dataclasses.dataclass(frozen=True)
class Headroom:
    available: int  # bytes this process may still allocate
    limit: int | None  # the container's memory limit, None without one
    used: int | None  # the container's memory that is not reclaimable page cache
    node_available: int | None  # the node's MemAvailable
    source: str  # where the binding figure comes from, for messages

    def describe(self) -> str:
        if self.limit is not None and self.source != MEMINFO.name:
            return (f"{size(self.available)} left under the container's memory limit of {size(self.limit)} "
                    f"({self.source}; {size(self.used)} in use)")
        return f"{size(self.available)} available on the node (MemAvailable)"


def size(count: int | float) -> str:
    from entrypoint.publish import human_size

    return human_size(int(count))


def headroom(
    cgroup: Path | None = None, meminfo: Path | None = None, self_cgroup: Path | None = None
) -> Headroom | None:
    """What is left, or None when neither the cgroup nor /proc/meminfo can be read (not Linux). The paths are
    the kernel's unless given."""
    limit, used, source = _cgroup(*_own_cgroup(cgroup or CGROUP, self_cgroup or SELF_CGROUP))
    node = _meminfo(meminfo or MEMINFO)
    candidates = []
    if limit is not None and used is not None:
        candidates.append((max(0, limit - used), source))
    if node is not None:
        candidates.append((node, MEMINFO.name))
    if not candidates:
        return None
    available, binding = min(candidates)
    return Headroom(available, limit, used, node, binding)


def short_of(need: int) -> Headroom | None:
    """What is left when it is less than `need` bytes; None when `need` fits or nothing can be read."""
    left = headroom()
    return left if left is not None and need > left.available else None


def _own_cgroup(root: Path, self_cgroup: Path) -> tuple[Path, Path]:
    """The v2 and v1 memory directories of this process's cgroup. A container with its own cgroup namespace
    (Kubernetes on cgroup v2) sees its cgroup as the root; without one, /proc/self/cgroup names the path,
    which exists under the mount unless the runtime mounted the container's cgroup as the root (Docker on v1)."""
    v2, v1 = root, root / "memory"
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        relative = path.strip().lstrip("/")
        if not relative:
            continue
        if controllers == "" and (root / relative / "memory.max").is_file():
            v2 = root / relative
        elif "memory" in controllers.split(",") and (v1 / relative / "memory.limit_in_bytes").is_file():
            v1 = v1 / relative
    return v2, v1


# (limit file, usage file, prefix of memory.stat's file-page counters, name) of cgroup v2, then v1.
LAYOUTS = (("memory.max", "memory.current", "", "cgroup v2 memory.max"),
           ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_", "cgroup v1 memory.limit_in_bytes"))


def _cgroup(v2_dir: Path, v1_dir: Path) -> tuple[int | None, int | None, str]:
    for directory, (limit_file, usage_file, prefix, name) in zip((v2_dir, v1_dir), LAYOUTS, strict=True):
        if not (directory / limit_file).is_file():
            continue
        stat = _stat(directory / "memory.stat")
        usage = _number(directory / usage_file)
        reclaimable = stat.get(f"{prefix}active_file", 0) + stat.get(f"{prefix}inactive_file", 0)
        return _number(directory / limit_file), None if usage is None else max(0, usage - reclaimable), name
    return None, None, ""


def _number(path: Path) -> int | None:
    """The file's integer; None for "max", a value meaning no limit, or a file that cannot be read."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    value = int(text)
    return None if value >= NO_LIMIT else value


def _stat(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    stat = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    return stat


def _meminfo(path: Path) -> int | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024  # kB
    return None
