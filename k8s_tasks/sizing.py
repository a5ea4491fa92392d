"""What a GKE node leaves for our pods: the machine shapes the overlays target and GKE's published reservations.

GKE's formula (docs "Plan GKE Standard node sizes", node allocatable): allocatable = capacity minus
- memory: 25% of the first 4 GiB, 20% of the next 4 GiB, 10% of the next 8 GiB, 6% of the next 112 GiB, 2% of
  anything above 128 GiB, plus 100 MiB for the kubelet's eviction threshold;
- CPU: 6% of the first core, 1% of the next, 0.5% of the next 2, 0.25% of every core above 4.
Assumed, not measured on a cluster (README "Verified offline / not yet verified on a cluster"):
- the kubelet's memory capacity is the machine's memory less 3% (the kernel's own share of it);
- GKE's DaemonSets on every node (Dataplane V2, logging, metrics, NodeLocal DNSCache, the GPU device plugin,
  CSI drivers) request at most 0.5 vCPU and 1 GiB together.

The tests check every overlay's requests against these shapes (tests/manifests/test_sizing.py); `invoke doctor`
names them when no node of the cluster fits, and prices them (k8s_tasks/prices.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

KERNEL_SHARE = 0.03
EVICTION_GIB = 100 / 1024
SYSTEM_PODS_CPU = 0.5
SYSTEM_PODS_GIB = 1.0
MEMORY_TIERS = ((4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02))
CPU_TIERS = ((1, 0.06), (1, 0.01), (2, 0.005), (float("inf"), 0.0025))
GPU = "nvidia.com/gpu"
ACCELERATOR = "cloud.google.com/gke-accelerator"


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
    gpu: str  # the node label cloud.google.com/gke-accelerator ("" for a CPU machine)

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

    def describe(self) -> str:
        gpus = f", {self.gpus} x {self.gpu}" if self.gpus else ""
        return f"{self.name} ({self.vcpus} vCPU, {self.memory_gib:g} GB{gpus})"


SHAPES = {s.name: s for s in (
    Shape("g2-standard-8", 8, 32, 1, "nvidia-l4"),
    Shape("g2-standard-24", 24, 96, 2, "nvidia-l4"),
    Shape("a2-highgpu-1g", 12, 85, 1, "nvidia-tesla-a100"),
    Shape("a3-highgpu-8g", 208, 1872, 8, "nvidia-h100-80gb"),
    # The CPU pool of the quickstart (README): system pods, the merge (up to 16 GiB) and an in-cluster MLflow.
    Shape("e2-standard-8", 8, 32, 0, ""),
)}
# The CPU machine the quickstart creates for the merge and the cluster's own pods.
CPU_MACHINE = "e2-standard-8"

# Per overlay: each target machine and the pods that may land on one node of it at once (each overlay's
# kustomization.yaml names them). The merge may share any node: it prefers CPU nodes but tolerates GPU ones
# (clusters with GPU pools only). A multi-node training pod is one whole node. The first machine that holds the
# training pod is the one the quickstart creates and the costs are quoted for.
OVERLAY_MACHINES: dict[str, dict[str, list[tuple[str, ...]]]] = {
    "dev": {"g2-standard-8": [("train", "merge"), ("webui", "merge")]},
    "gpu": {"g2-standard-24": [("train", "webui", "merge")],
            "a2-highgpu-1g": [("train", "merge"), ("webui", "merge")]},
    "prod": {"a3-highgpu-8g": [("train", "merge")], "g2-standard-8": [("webui", "merge")]},
    "multinode": {"a3-highgpu-8g": [("train", "merge")], "g2-standard-8": [("webui", "merge")]},
}


def training_machines(env: str) -> list[str]:
    """The machine types an overlay's training pod is sized for, the preferred one first."""
    return [name for name, groups in OVERLAY_MACHINES[env].items() if any("train" in g for g in groups)]


def webui_machine(env: str) -> str:
    """The machine type of the WebUI's node (its own, or shared with training)."""
    return next(name for name, groups in OVERLAY_MACHINES[env].items() if any("webui" in g for g in groups))


def cpu(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity in cores ("7910m", "8", 0.5)."""
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(str(quantity)))


def gib(quantity: str | int | float) -> float:
    """A Kubernetes memory quantity in GiB ("48Gi", "32879584Ki", "100M")."""
    from kubernetes.utils import parse_quantity

    return float(parse_quantity(str(quantity))) / 2**30


@dataclasses.dataclass(frozen=True)
class PodShape:
    """What one pod requests: CPU cores, memory GiB, GPUs; and how many such pods run at once."""

    cpu: float
    memory_gib: float
    gpus: int
    pods: int = 1

    def describe(self) -> str:
        gpus = f", {self.gpus} GPU{'s' if self.gpus > 1 else ''}" if self.gpus else ""
        one = f"{self.cpu:g} CPU, {self.memory_gib:g} GiB{gpus}"
        return one if self.pods == 1 else f"{self.pods} pods of {one} each"


def job_shape(job: dict[str, Any]) -> PodShape:
    """The requests of a rendered Job's pod and how many pods run at once (parallelism)."""
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    requests = container["resources"]["requests"]
    return PodShape(cpu(requests["cpu"]), gib(requests["memory"]), int(requests.get(GPU, 0)),
                    int(job["spec"].get("parallelism") or 1))
