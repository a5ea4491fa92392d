"""Helpers of the rendered-manifest tests that the tasks do not need: walking pod specs, reading which
components an overlay uses.

Copying, rendering and parsing the overlays, and finding objects in a render, use the tasks' own helpers
(k8s_tasks.overlays): the tests check exactly what `invoke deploy`, `invoke validate` and `invoke generate`
render. The copy writes every overlay's `mlflow.env` from its committed `mlflow.env.example`, so renders
never depend on (or leak) a developer's real secret file, and work in a fresh clone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from k8s_tasks.tools import REPO


def uses_component(overlay: str, component: str) -> bool:
    """Whether overlays/<overlay> includes components/<component>."""
    kustomization = yaml.safe_load((REPO / "overlays" / overlay / "kustomization.yaml").read_text())
    return f"../../components/{component}" in kustomization.get("components", [])


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload: Pods, and the pod templates of controllers."""
    for doc in docs:
        kind = doc["kind"]
        if kind == "Pod":
            yield f"Pod/{doc['metadata']['name']}", doc["spec"]
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield f"{kind}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield f"CronJob/{doc['metadata']['name']}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        *pod_spec.get("initContainers", []),
        *pod_spec.get("containers", []),
        *pod_spec.get("ephemeralContainers", []),
    ]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """Plain env entries by name: the value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}
