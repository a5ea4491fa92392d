"""Manifests for the task tests: what `invoke deploy` leaves in the cluster, and Jobs and pods in given states."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

from k8s_tasks.image import ImageRef
from k8s_tasks.overlays import render_overlay

REGISTRY = "europe-west4-docker.pkg.dev/my-project/training/llama-factory-train"
# What a deploy of each overlay ships: prod only by digest.
DEPLOYED = {
    "dev": ImageRef(REGISTRY, tag="0123456789ab"),
    "gpu": ImageRef(REGISTRY, tag="0123456789ab-dirty"),
    "prod": ImageRef(REGISTRY, tag="0123456789ab", digest="sha256:" + "ab" * 32),
    "multinode": ImageRef(REGISTRY, tag="0123456789ab"),
}
# Kinds the fake cluster answers for; deploy never applies Jobs.
DEPLOYED_KINDS = ("ConfigMap", "Secret", "PersistentVolumeClaim", "ServiceAccount", "Deployment", "Service",
                  "Namespace", "PersistentVolume")
# Renders of identical trees (every test gets its own copy) are made once.
_RENDERS: dict[tuple[str, ImageRef, str], list[dict[str, Any]]] = {}


def deployed(env: str, root: Path, image: ImageRef | None = None, created: str = "2026-01-01T10:00:00Z",
             ) -> list[dict[str, Any]]:
    """The objects `invoke deploy --env=<env>` applies (the real render of root's overlay), as the API server
    returns them."""
    out = []
    image = image or DEPLOYED[env]
    key = (env, image, _fingerprint(root))
    if key not in _RENDERS:
        _RENDERS[key] = render_overlay(env, image, root)
    for doc in copy.deepcopy(_RENDERS[key]):
        if doc["kind"] in DEPLOYED_KINDS:
            doc["metadata"]["creationTimestamp"] = created
            out.append(doc)
    return out


def _fingerprint(root: Path) -> str:
    """The kustomize tree's content: renders of identical trees (each test's copy) are reused."""
    digest = hashlib.sha256()
    for path in sorted(p for d in ("base", "components", "overlays") for p in (root / d).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()



def job(name: str, component: str = "train", *, complete: bool = False, failed: str | None = None,
        message: str = "", created: str = "2026-01-02T03:00:00Z", start: str | None = "2026-01-02T03:00:05Z",
        end: str | None = None, retries: int = 0, failed_at: str | None = None, queue: str | None = None,
        suspend: bool = False) -> dict[str, Any]:
    """A Job as the API server returns it; `queue`: labelled for that Kueue LocalQueue (components/kueue)."""
    conditions = []
    if complete:
        conditions.append({"type": "Complete", "status": "True", "reason": "", "message": ""})
    if failed:
        conditions.append({"type": "Failed", "status": "True", "reason": failed, "message": message,
                           "lastTransitionTime": failed_at})
    labels = {"app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "llm-training",
              "app.kubernetes.io/name": "llama-factory"}
    if queue is not None:
        labels["kueue.x-k8s.io/queue-name"] = queue
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": "llm-training", "creationTimestamp": created,
                     "uid": f"uid-{name}", "labels": labels},
        "spec": {"suspend": suspend, "template": {"spec": {"containers": [{"name": component, "image": "x"}]}}},
        "status": {"conditions": conditions, "startTime": start, "completionTime": end,
                   "failed": retries or None},
    }


def pod(name: str, job_name: str | None, container: str = "train", *, phase: str = "Running",
        created: str = "2026-01-02T03:00:10Z", node: str | None = "gke-gpu-pool-1",
        exit_code: int | None = None, message: str = "", finished: str = "2026-01-02T03:20:00Z",
        waiting: tuple[str, str] | None = None, unschedulable: str | None = None,
        config_map: str = "llm-config-abc", component: str = "train") -> dict[str, Any]:
    labels = {"app.kubernetes.io/part-of": "llm-training", "app.kubernetes.io/name": "llama-factory",
              "app.kubernetes.io/component": component}
    if job_name:
        labels["batch.kubernetes.io/job-name"] = job_name
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                "message": message, "finishedAt": finished, "startedAt": created}}
    elif waiting:
        state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    elif phase == "Running":
        state = {"running": {"startedAt": created}}
    else:
        state = None
    statuses = [] if state is None else [{"name": container, "ready": phase == "Running", "restartCount": 0,
                                           "image": "x", "imageID": "", "state": state}]
    conditions = []
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": unschedulable})
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "llm-training", "creationTimestamp": created, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": container, "image": "x",
                                                   "envFrom": [{"configMapRef": {"name": config_map}}]}]},
        "status": {"phase": phase, "conditions": conditions, "containerStatuses": statuses},
    }


def workload(job_name: str, *conditions: tuple[str, str, str, str]) -> dict[str, Any]:
    """Kueue's Workload of a Job (as the custom-objects API returns it), with (type, status, reason, message)
    conditions."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
        "metadata": {"name": f"job-{job_name}-1a2b3", "namespace": "llm-training",
                     "labels": {"kueue.x-k8s.io/job-uid": f"uid-{job_name}"}},
        "status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m}
                                  for t, s, r, m in conditions]},
    }


def local_queue(name: str) -> dict[str, Any]:
    return {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": "llm-training"}, "spec": {"clusterQueue": name}}


def config_map(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "llm-training"},
            "data": data}


def bound(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The deployed objects once the storage claim is Bound to its volume, as the API server reports them."""
    out = copy.deepcopy(objects)
    for doc in out:
        if doc["kind"] == "PersistentVolumeClaim":
            doc["metadata"]["uid"] = "claim-uid-1"
            doc["status"] = {"phase": "Bound", "accessModes": doc["spec"]["accessModes"],
                             "capacity": {"storage": doc["spec"]["resources"]["requests"]["storage"]}}
        if doc["kind"] == "PersistentVolume":
            doc["spec"]["claimRef"]["uid"] = "claim-uid-1"
            doc["status"] = {"phase": "Bound"}
    return out


def node(name: str, *, pool: str, machine: str, cpu: str, memory: str, gpus: int = 0, accelerator: str = "",
         gpu_label: bool = True, spot: bool = False, taints: list[dict[str, str]] | None = None, ready: bool = True,
         region: str = "us-central1") -> dict[str, Any]:
    """A GKE node: the labels GKE sets (pool, machine type, accelerator, Spot, region) and its allocatable."""
    labels = {"cloud.google.com/gke-nodepool": pool, "node.kubernetes.io/instance-type": machine,
              "topology.kubernetes.io/region": region, "kubernetes.io/hostname": name}
    allocatable = {"cpu": cpu, "memory": memory, "pods": "110"}
    if accelerator:
        labels["cloud.google.com/gke-accelerator"] = accelerator
        allocatable["nvidia.com/gpu"] = str(gpus)
        if gpu_label:
            labels["nvidia.com/gpu"] = "true"  # what the quickstart's --node-labels adds
    if spot:
        labels["cloud.google.com/gke-spot"] = "true"
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "spec": {"taints": taints or []},
            "status": {"allocatable": allocatable, "capacity": allocatable,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


# Allocatable of the machines, by GKE's formula (k8s_tasks/sizing.py), as the kubelet reports it.
def gpu_node(name: str = "gke-train-gpu-l4-1", **overrides: Any) -> dict[str, Any]:
    values = {"pool": "gpu-l4", "machine": "g2-standard-24", "cpu": "23870m", "memory": "89967616Ki", "gpus": 2,
              "accelerator": "nvidia-l4", **overrides}
    return node(name, **values)


def cpu_node(name: str = "gke-train-default-pool-1") -> dict[str, Any]:
    return node(name, pool="default-pool", machine="e2-standard-8", cpu="7910m", memory="28732416Ki")


def daemon_set(name: str, app: str) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": "kube-system", "labels": {"k8s-app": app}},
            "spec": {"selector": {"matchLabels": {"k8s-app": app}},
                     "template": {"metadata": {"labels": {"k8s-app": app}},
                                  "spec": {"containers": [{"name": name, "image": "x"}]}}}}


def event(kind: str, name: str, reason: str, message: str, type_: str = "Warning") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{name}.{reason.lower()}", "namespace": "llm-training"},
            "involvedObject": {"kind": kind, "name": name, "namespace": "llm-training"},
            "reason": reason, "message": message, "type": type_}


def pod_state(manifest: dict[str, Any], phase: str = "Pending", *, waiting: tuple[str, str] | None = None,
              unschedulable: str | None = None, exit_code: int | None = None, message: str = "",
              node_name: str | None = "gke-train-default-pool-1", reason: str | None = None) -> dict[str, Any]:
    """The created pod (its manifest as sent) in a given state, as the API server returns it."""
    state = copy.deepcopy(manifest)
    container = state["spec"]["containers"][0]["name"]
    if unschedulable is not None:
        node_name = None
    if node_name:
        state["spec"]["nodeName"] = node_name
    conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}] \
        if unschedulable is not None else []
    if exit_code is not None:
        current = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                  "message": message, "finishedAt": "2026-01-02T03:05:00Z"}}
    elif waiting is not None:
        current = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    elif phase == "Running":
        current = {"running": {"startedAt": "2026-01-02T03:04:30Z"}}
    else:
        current = None
    statuses = [] if current is None else [{"name": container, "ready": phase == "Running", "restartCount": 0,
                                             "image": container, "imageID": "", "state": current}]
    state["status"] = {"phase": phase, "conditions": conditions, "containerStatuses": statuses}
    if reason:
        state["status"]["reason"] = reason
    return state
