"""What a GKE node leaves for our pods: the machine shapes the overlays target and GKE's published reservations.

GKE's formula (docs "Plan GKE Standard node sizes", node allocatable): allocatable = capacity minus
- memory: 25% of the first 4 GiB, 20% of the next 4 GiB, 10% of the next 8 GiB, 6% of the next 112 GiB, 2% of
  anything above 128 GiB, plus 100 MiB for the kubelet's eviction threshold;
- CPU: 6% of the first core, 1% of the next, 0.5% of the next 2, 0.25% of every core above 4.
Assumed, not measured on a cluster (README "Verified offline / not yet verified on a cluster"):
- the kubelet's memory capacity is the machine's memory less 3% (the kernel's own share of it);
- GKE's DaemonSets on every node (Dataplane V2, logging, metrics, NodeLocal DNSCache, the GPU device plugin,
  CSI drivers) request at most 0.5 vCPU and 1 GiB together.
"""

from __future__ import annotations

import dataclasses

KERNEL_SHARE = 0.03
EVICTION_GIB = 100 / 1024
SYSTEM_PODS_CPU = 0.5
SYSTEM_PODS_GIB = 1.0
MEMORY_TIERS = ((4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02))
CPU_TIERS = ((1, 0.06), (1, 0.01), (2, 0.005), (float("inf"), 0.0025))


def _reserved(amount: float, tiers: tuple[tuple[float, float], ...]) -> float:
    total, rest = 0.0, amount
    for size, share in tiers:
        part = min(rest, size)
        total += part * share
        rest -= part
        if rest <= 0:
            break
    return total


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Compute Engine machine type (memory in GiB, as Compute Engine counts its GB)."""

    name: str
    vcpus: int
    memory_gib: float
    gpus: int
    gpu: str  # the node label cloud.google.com/gke-accelerator

    @property
    def capacity_gib(self) -> float:
        return self.memory_gib * (1 - KERNEL_SHARE)

    @property
    def allocatable_cpu(self) -> float:
        return self.vcpus - _reserved(self.vcpus, CPU_TIERS)

    @property
    def allocatable_gib(self) -> float:
        return self.capacity_gib - _reserved(self.capacity_gib, MEMORY_TIERS) - EVICTION_GIB

    @property
    def for_pods(self) -> tuple[float, float]:
        """CPU and GiB left for this project's pods once GKE's own DaemonSets are placed."""
        return self.allocatable_cpu - SYSTEM_PODS_CPU, self.allocatable_gib - SYSTEM_PODS_GIB


SHAPES = {s.name: s for s in (
    Shape("g2-standard-8", 8, 32, 1, "nvidia-l4"),
    Shape("g2-standard-24", 24, 96, 2, "nvidia-l4"),
    Shape("a2-highgpu-1g", 12, 85, 1, "nvidia-tesla-a100"),
    Shape("a3-highgpu-8g", 208, 1872, 8, "nvidia-h100-80gb"),
)}

_UNITS = {"Ki": 1 / 1024 ** 2, "Mi": 1 / 1024, "Gi": 1.0, "Ti": 1024.0}


def cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gib(quantity: str) -> float:
    for suffix, factor in _UNITS.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    raise ValueError(f"memory quantity {quantity!r}: expected Ki, Mi, Gi or Ti")
