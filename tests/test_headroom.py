"""The memory a container has left, read as the kernel writes it: cgroup v2 (Kubernetes on GKE, COS), cgroup v1
(older nodes, Docker), and the node's MemAvailable. Page cache is reclaimed before anything is killed, so the
files a merge just wrote do not count as used."""

from __future__ import annotations

from pathlib import Path

from entrypoint.headroom import MEMINFO, headroom

GIB = 1024**3
MIB = 1024**2


def meminfo(tmp_path: Path, available: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       24684084 kB\nMemFree:         1000000 kB\n"
                    f"MemAvailable:   {available // 1024} kB\nBuffers:          100000 kB\n")
    return path


def v2(tmp_path: Path, limit: str, current: int, active_file: int, inactive_file: int, under: str = "") -> Path:
    root = tmp_path / "cgroup"
    directory = root / under
    directory.mkdir(parents=True)
    (directory / "memory.max").write_text(f"{limit}\n")
    (directory / "memory.current").write_text(f"{current}\n")
    (directory / "memory.stat").write_text(f"anon {current - active_file - inactive_file}\nfile "
                                           f"{active_file + inactive_file}\nactive_file {active_file}\n"
                                           f"inactive_file {inactive_file}\nshmem 0\n")
    return root


def self_cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "self-cgroup"
    path.write_text(text)
    return path


def test_a_v2_limit_leaves_what_is_not_page_cache(tmp_path: Path):
    root = v2(tmp_path, str(4 * GIB), current=3 * GIB, active_file=GIB, inactive_file=GIB // 2)
    left = headroom(root, meminfo(tmp_path, 20 * GIB), self_cgroup(tmp_path, "0::/\n"))
    assert left is not None
    assert left.available == int(2.5 * GIB) and left.limit == 4 * GIB and left.used == int(1.5 * GIB)
    assert "left under the container's memory limit of 4.00 GiB (cgroup v2 memory.max" in left.describe()


def test_without_a_limit_the_node_binds(tmp_path: Path):
    root = v2(tmp_path, "max", current=GIB, active_file=0, inactive_file=0)
    left = headroom(root, meminfo(tmp_path, 3 * GIB), self_cgroup(tmp_path, "0::/\n"))
    assert left is not None and left.limit is None and left.available == 3 * GIB
    assert left.describe() == "3.00 GiB available on the node (MemAvailable)"


def test_a_limit_above_what_the_node_has_left_is_not_what_binds(tmp_path: Path):
    root = v2(tmp_path, str(16 * GIB), current=GIB, active_file=0, inactive_file=0)
    left = headroom(root, meminfo(tmp_path, 2 * GIB), self_cgroup(tmp_path, "0::/\n"))
    assert left is not None and left.available == 2 * GIB and left.source == MEMINFO.name


def test_the_process_own_v2_cgroup_is_found_below_the_mount(tmp_path: Path):
    root = v2(tmp_path, str(2 * GIB), current=GIB, active_file=0, inactive_file=0, under="kubepods/pod1/merge")
    (root / "memory.max").write_text("max\n")  # the parent: no limit of its own
    left = headroom(root, meminfo(tmp_path, 20 * GIB), self_cgroup(tmp_path, "0::/kubepods/pod1/merge\n"))
    assert left is not None and left.limit == 2 * GIB and left.available == GIB


def test_v1_with_its_no_limit_value_and_with_a_limit(tmp_path: Path):
    root = tmp_path / "cgroup"
    memory = root / "memory"
    memory.mkdir(parents=True)
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (memory / "memory.usage_in_bytes").write_text(f"{3 * GIB}\n")
    (memory / "memory.stat").write_text(f"cache {2 * GIB}\nrss {GIB}\ntotal_active_file {GIB}\n"
                                        f"total_inactive_file {GIB}\n")
    # Docker on v1 mounts the container's own cgroup as the root: the host path in /proc/self/cgroup is absent.
    own = self_cgroup(tmp_path, "12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n0::/\n")
    left = headroom(root, meminfo(tmp_path, 5 * GIB), own)
    assert left is not None and left.limit is None and left.available == 5 * GIB

    (memory / "memory.limit_in_bytes").write_text(f"{2 * GIB}\n")
    left = headroom(root, meminfo(tmp_path, 5 * GIB), own)
    assert left is not None and left.limit == 2 * GIB and left.used == GIB and left.available == GIB
    assert "cgroup v1 memory.limit_in_bytes" in left.describe()


def test_nothing_readable_is_unknown_not_zero(tmp_path: Path):
    assert headroom(tmp_path / "none", tmp_path / "none", tmp_path / "none") is None


def test_this_machine_reads_as_the_kernel_writes_it():
    """The real /proc/meminfo, /proc/self/cgroup and cgroup mount: whatever this machine is, the figure is
    positive and no larger than its memory."""
    left = headroom()
    assert left is not None
    total = next(int(line.split()[1]) * 1024 for line in MEMINFO.read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert 0 < left.available <= total
    assert left.node_available is not None and 0 < left.node_available <= total
