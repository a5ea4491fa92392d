"""Every pod fits the GKE machine its overlay names, and what may share a node fits it together (k8s_tasks/sizing.py:
GKE's published reservations). The WebUI never takes a training GPU."""

from __future__ import annotations

import pytest

from k8s_tasks.overlays import ENVS, one
from k8s_tasks.sizing import OVERLAY_MACHINES, SHAPES, Shape, cpu, gib
from k8s_tasks.tools import REPO

GPU = "nvidia.com/gpu"
ACCELERATOR = "cloud.google.com/gke-accelerator"


def _pod(docs: list[dict], component: str) -> dict:
    return one(docs, "Deployment" if component == "webui" else "Job", component)["spec"]["template"]["spec"]


def _requests(pod: dict) -> tuple[float, float, int]:
    (container,) = pod["containers"]
    requests = container["resources"]["requests"]
    return cpu(requests["cpu"]), gib(requests["memory"]), int(requests.get(GPU, 0))


def _fits(shape: Shape, pods: list[dict]) -> tuple[float, float]:
    """The headroom (CPU, GiB) left on one node of the shape with these pods, after GKE's own."""
    cpus, memory = shape.for_pods
    used = [_requests(p) for p in pods]
    assert sum(u[2] for u in used) <= shape.gpus, f"{shape.name}: more GPUs requested than it has"
    for p in pods:
        accelerator = p.get("nodeSelector", {}).get(ACCELERATOR)
        assert accelerator in (None, shape.gpu), f"{shape.name} has {shape.gpu}, a pod selects {accelerator}"
    return cpus - sum(u[0] for u in used), memory - sum(u[1] for u in used)


def test_the_allocatable_formula_matches_gkes_published_examples() -> None:
    """GKE's own worked numbers for the reservations (before the kernel's share and the DaemonSets)."""
    from k8s_tasks.sizing import CPU_TIERS, MEMORY_TIERS, _reserved

    assert _reserved(4, MEMORY_TIERS) == pytest.approx(1.0)  # 25% of 4 GiB
    assert _reserved(8, MEMORY_TIERS) == pytest.approx(1.8)  # + 20% of the next 4
    assert _reserved(16, MEMORY_TIERS) == pytest.approx(2.6)  # + 10% of the next 8
    assert _reserved(128, MEMORY_TIERS) == pytest.approx(9.32)  # + 6% of the next 112
    assert _reserved(256, MEMORY_TIERS) == pytest.approx(11.88)  # + 2% above 128
    assert _reserved(1, CPU_TIERS) == pytest.approx(0.06)
    assert _reserved(4, CPU_TIERS) == pytest.approx(0.08)
    assert _reserved(8, CPU_TIERS) == pytest.approx(0.09)


@pytest.mark.parametrize("overlay", ENVS)
def test_what_runs_together_fits_the_named_machines(overlay: str, docs: dict) -> None:
    for name, groups in OVERLAY_MACHINES[overlay].items():
        for group in groups:
            cpus, memory = _fits(SHAPES[name], [_pod(docs[overlay], c) for c in group])
            assert cpus >= 0 and memory >= 0, f"{overlay} on {name}: {group} leaves {cpus:.2f} CPU, {memory:.1f} GiB"


@pytest.mark.parametrize("overlay", ENVS)
def test_each_overlay_names_its_machines_in_its_kustomization_and_the_readme(overlay: str) -> None:
    kustomization = (REPO / "overlays" / overlay / "kustomization.yaml").read_text()
    readme = (REPO / "README.md").read_text()
    for name in OVERLAY_MACHINES[overlay]:
        assert name in kustomization, f"overlays/{overlay} does not name {name}"
        assert f"`{name}`" in readme, f"README does not name {name}"


@pytest.mark.parametrize("overlay", ENVS)
def test_the_webui_never_takes_a_training_gpu(overlay: str, docs: dict) -> None:
    webui = one(docs[overlay], "Deployment", "webui")
    train = _pod(docs[overlay], "train")
    if _requests(train)[2] == 8:
        # Training takes whole 8-GPU nodes: the WebUI has its own L4 pool and does not run until started.
        assert webui["spec"]["replicas"] == 0
        assert webui["spec"]["template"]["spec"]["nodeSelector"][ACCELERATOR] == "nvidia-l4"
        assert train["nodeSelector"][ACCELERATOR] != "nvidia-l4"
    else:
        # One GPU each: the WebUI's is never the one training needs (a second GPU of the node, or its own node).
        assert webui["spec"]["replicas"] == 1
        assert _requests(webui["spec"]["template"]["spec"])[2] == _requests(train)[2] == 1


@pytest.mark.parametrize("overlay", ENVS)
def test_the_merge_holds_little_while_it_waits(overlay: str, docs: dict) -> None:
    """The merge Job starts with training and waits for it: its requests are what the waiting process needs
    (24 MiB measured), its limits what the streaming merge needs (3 x a 5 GB shard plus the runtime)."""
    (container,) = _pod(docs[overlay], "merge")["containers"]
    resources = container["resources"]
    assert cpu(resources["requests"]["cpu"]) <= 0.1 and gib(resources["requests"]["memory"]) <= 0.5
    assert cpu(resources["limits"]["cpu"]) >= 2 and gib(resources["limits"]["memory"]) >= 16
    assert GPU not in resources["requests"]
