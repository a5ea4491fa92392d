"""Shared helpers of the rendered-manifest tests: find the real tools, render the overlays, walk pod specs.

The tests render a copy of base/, components/ and overlays/ in which every overlay's `mlflow.env` is
written from its committed `mlflow.env.example`: renders never depend on (or leak) a developer's real
secret file, and they work in a fresh clone where no `mlflow.env` exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from k8s_tasks import overlays

REPO = Path(__file__).resolve().parents[2]
EXPECTED_DIR = Path(__file__).resolve().parent / "expected"
OVERLAYS = ("gpu", "prod", "dev", "multinode")
KUSTOMIZE_DIRS = overlays.KUSTOMIZE_DIRS
# Oldest and newest Kubernetes minors we support. 1.31 is the first with podFailurePolicy GA (the Jobs
# depend on it); 1.37 is the newest schema kubernetes-validate ships. GKE's channels lie in between.
K8S_MINORS = ("1.31", "1.37")
# Set to 1 to rewrite the reviewed files (expected renders, base/llm-config.env) instead of comparing.
UPDATE = os.environ.get("UPDATE_EXPECTED") == "1"
MISSING_TOOL = "{name} not found on PATH nor in {where}: run `bash scripts/ensure-tools.sh` first"


def find_tool(name: str, *fallbacks: Path) -> str:
    """Path of a required tool; raises (the caller's test fails) when it is missing, never skips."""
    found = shutil.which(name)
    if found:
        return found
    for candidate in fallbacks:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    where = ", ".join(str(p.parent) for p in fallbacks)
    raise FileNotFoundError(MISSING_TOOL.format(name=name, where=where))


def kubectl() -> str:
    return find_tool("kubectl", REPO / ".tools" / "bin" / "kubectl")


def checkov() -> str:
    return find_tool("checkov", REPO / ".venv-checkov" / "bin" / "checkov")


def copy_tree(dest: Path) -> Path:
    """The kustomize directories copied to dest, each overlay's mlflow.env made from its example (the
    tasks' own helper: tests render exactly what `invoke deploy` and `invoke validate` render)."""
    return overlays.copy_tree(dest, REPO)


def uses_component(overlay: str, component: str) -> bool:
    """Whether overlays/<overlay> includes components/<component>."""
    kustomization = yaml.safe_load((REPO / "overlays" / overlay / "kustomization.yaml").read_text())
    return f"../../components/{component}" in kustomization.get("components", [])


def render(path: Path) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return result.stdout


def parse(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    """Objects of a kind, optionally only those labelled app.kubernetes.io/component=<component>."""
    out = []
    for doc in docs:
        labels = doc["metadata"].get("labels") or {}
        if doc["kind"] == kind and (
            component is None or labels.get("app.kubernetes.io/component") == component
        ):
            out.append(doc)
    return out


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, component)
    assert len(found) == 1, (
        f"expected one {kind} {component or ''}, found {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


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


def llm_config_env_text() -> str:
    from entrypoint.settings import configmap_env_text

    return configmap_env_text()
