"""The probe pod of `invoke doctor`: the overlay's training pod, rendered, minus what only training needs (ADR-015).

Why derived from the rendered training Job, and not a kustomize resource of its own: the probe is worth
something only while it is the training pod in everything but the GPU: the same image (the deployed one),
user, securityContext, environment (llm-config, the mlflow-config Secret, the identity ConfigMap), volumes and
labels (which the NetworkPolicies select on). A Pod manifest in the overlays would be a second copy of all that
to keep in step, and `kubectl apply -k` would start it on every apply. So it is computed, like the Jobs
`invoke train` starts, as a copy of the render with a few fields changed (no YAML is written by hand); the
tests run it through the checks every rendered workload passes (kubernetes-validate --strict, checkov, Pod
Security "restricted") and check that the same NetworkPolicies select it.

What changes: the command (`python -m entrypoint probe`), small CPU and memory and no GPU (so it does not wait
for, or scale up, a GPU node), no /dev/shm volume (memory-backed, for training's data loaders), no GPU node
selector, no multi-node subdomain, a deadline (activeDeadlineSeconds) and its own name and label.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from k8s_tasks.overlays import NAMESPACE

CONTAINER = "probe"
LABEL = "llama-factory/probe"
COMMAND = ["python", "-m", "entrypoint", "probe"]
# Imports the settings and MLflow's client (~300 MB measured with the training stack): a fraction of a core.
RESOURCES = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
SHM_VOLUME = "dshm"
CHECKOV_SKIP = "checkov.io/skip"
# checkov asks every Pod for health probes; a pod that runs one command to completion serves nothing to be ready
# for, and its deadline, not a liveness probe, bounds it.
PROBE_SKIPS = {
    "checkov.io/skip8": "CKV_K8S_8=runs one check to completion in seconds and serves nothing; activeDeadlineSeconds "
                        "bounds it where a liveness probe would restart it",
    "checkov.io/skip9": "CKV_K8S_9=runs one check to completion and serves nothing: there is no readiness to report",
}


def probe_name(now: datetime) -> str:
    return f"llama-probe-{now.astimezone(UTC):%Y%m%d-%H%M%S}"


def probe_pod(job: dict[str, Any], name: str, *, deadline_seconds: int) -> dict[str, Any]:
    """A Pod manifest from a rendered training Job (with the deployed image already set)."""
    template = copy.deepcopy(job["spec"]["template"])
    spec = template["spec"]
    (container,) = spec["containers"]
    container.update(name=CONTAINER, command=COMMAND, resources=copy.deepcopy(RESOURCES))
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != SHM_VOLUME]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != SHM_VOLUME]
    # No GPU requested: any node that mounts the storage will do (the GPU toleration stays, for clusters of GPU
    # nodes only). The subdomain names a multi-node Job's headless Service: the probe is no node of it.
    spec.pop("nodeSelector", None)
    spec.pop("subdomain", None)
    spec["restartPolicy"] = "Never"
    # Counted from the pod's start on a node: the doctor stops waiting earlier and deletes it; this bounds a pod
    # whose doctor was killed.
    spec["activeDeadlineSeconds"] = deadline_seconds
    labels = {**(template.get("metadata") or {}).get("labels", {}), LABEL: "true"}
    # The checkov skips of the Job apply to its container, which the probe's is: the same image reference and the
    # same Secret in its environment.
    annotations = {k: v for k, v in (job["metadata"].get("annotations") or {}).items() if k.startswith(CHECKOV_SKIP)}
    metadata = {"name": name, "namespace": job["metadata"].get("namespace", NAMESPACE), "labels": labels,
                "annotations": {**annotations, **PROBE_SKIPS}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
