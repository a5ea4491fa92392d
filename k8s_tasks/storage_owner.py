"""`invoke prepare-storage --env=<env>`: the one-time admin step that lets the pods (UID 10001) write the storage.

The pods run as UID/GID 10001 and fsGroup is not applied to NFS or ReadWriteMany Filestore volumes, so a fresh
export owned by root refuses their first write. This runs admin/storage-owner: a root Job in a namespace of its
own (Pod Security "baseline"; llm-training's "restricted" refuses root), which mounts the export the storage
claim is bound to and hands the directories the configuration names to 10001, then deletes that namespace.

The export comes from the live volume the claim is bound to (an NFS PersistentVolume, or the Filestore share a
dynamically provisioned one points at), the image and the directories from what `invoke deploy` applied.
An NFS server that squashes root refuses the chown: the README gives the server-side commands for that case.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from invoke.exceptions import Exit

from k8s_tasks.cluster import Cluster, kubeconfig_problem
from k8s_tasks.jobs import deployed_template
from k8s_tasks.overlays import NAMESPACE, one, parse, render
from k8s_tasks.plan import Command, Plan
from k8s_tasks.tools import REPO

ADMIN_DIR = Path("admin/storage-owner")
ADMIN_NAMESPACE = "llm-storage-admin"
JOB = "llama-storage-owner"
OWNER = "10001"  # the pods' UID and GID (docker/Dockerfile, base/*.yaml securityContext)
STORAGE = PurePosixPath("/storage")
# The settings that name where the pods read and write (entrypoint/settings.py): their first directory below
# /storage is what the Job creates and hands over.
PATH_SETTINGS = ("BASE_MODEL_PATH", "LORA_OUTPUT_PATH", "MERGED_MODEL_PATH", "DATASET_PATH", "WEBUI_WORKDIR")
LOGS_TIMEOUT = "10m"


def directories(config: dict[str, str]) -> list[str]:
    """The directories right below /storage that the configuration's paths lie in (models, output, data, webui)."""
    found = set()
    for name in PATH_SETTINGS:
        path = PurePosixPath(config.get(name, ""))
        if path.is_relative_to(STORAGE) and path != STORAGE:
            found.add(path.relative_to(STORAGE).parts[0])
    return sorted(found)


def export_of(cluster: Cluster, env: str, claim_name: str) -> tuple[str, str]:
    """(server, path) of the NFS export or Filestore share the storage claim is bound to."""
    claim = cluster.get("PersistentVolumeClaim", claim_name)
    if claim is None or claim.status.phase != "Bound":
        state = "is not deployed" if claim is None else f"is {claim.status.phase}, bound to no volume"
        raise Exit(f"the storage claim {claim_name} {state}: `invoke deploy --env={env}` first; "
                   f"`invoke doctor --env={env}` says why it does not bind")
    volume = cluster.get("PersistentVolume", claim.spec.volume_name)
    if volume is not None and volume.spec.nfs is not None:
        return volume.spec.nfs.server, volume.spec.nfs.path
    attributes = (volume.spec.csi.volume_attributes or {}) if volume is not None and volume.spec.csi else {}
    if "ip" in attributes and "volume" in attributes:  # a Filestore share (filestore.csi.storage.gke.io)
        return attributes["ip"], f"/{attributes['volume']}"
    raise Exit(f"volume {claim.spec.volume_name} of claim {claim_name} is neither an NFS export nor a Filestore "
               f"share: make its root writable by UID/GID {OWNER} where it is served")


def admin_manifests(image: str, server: str, path: str, dirs: list[str], *, recursive: bool,
                    root: Path = REPO) -> list[dict[str, Any]]:
    """admin/storage-owner rendered, with the image, the export and the directories filled in."""
    docs = parse(render(root / ADMIN_DIR))
    pod = one(docs, "Job")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["image"] = image
    values = {"DIRECTORIES": " ".join(dirs), "RECURSIVE": "1" if recursive else "0"}
    for variable in container["env"]:
        variable["value"] = values.get(variable["name"], variable["value"])
    (volume,) = pod["volumes"]
    volume["nfs"] = {"server": server, "path": path}
    # The Job last: its pod starts with the namespace's default-deny policy already in place.
    return sorted(docs, key=lambda doc: doc["kind"] == "Job")


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the Job's script) as YAML blocks: what a reviewer reads under --dry-run."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def plan_prepare_storage(env: str, cluster: Cluster, *, recursive: bool = False, root: Path = REPO) -> Plan:
    template, identity, _ = deployed_template(env, "train", cluster, root=root)
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["template"]["spec"]["volumes"]
                 if "persistentVolumeClaim" in v)
    server, path = export_of(cluster, env, claim)
    dirs = directories(identity.config)
    docs = admin_manifests(identity.image, server, path, dirs, recursive=recursive, root=root)
    where = ("-n", ADMIN_NAMESPACE, f"job/{JOB}")
    steps = [
        Command(("kubectl", "apply", "-f", "-"), yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False),
                f"namespace {ADMIN_NAMESPACE}, its default-deny policy, Job {JOB} (root)"),
        # Waits for the pod to run (pulling the image included), then shows what it did until it ends.
        Command(("kubectl", "logs", "--follow", f"--pod-running-timeout={LOGS_TIMEOUT}", *where)),
        Command(("kubectl", "wait", "--for=condition=complete", "--timeout=60s", *where)),
        Command(("kubectl", "delete", "namespace", ADMIN_NAMESPACE, "--wait=false")),
    ]
    scope = "everything below them" if recursive else "the directories themselves (files inside keep their owner)"
    title = (f"prepare the storage of overlays/{env} in kube context {cluster.context}: a root Job in namespace "
             f"{ADMIN_NAMESPACE} mounts {server}:{path} and hands {', '.join(f'{d}/' for d in dirs)} and the "
             f"export's root to UID/GID {OWNER} (mode 775), {scope}")
    notes = [
        f"it runs as root (CHOWN, FOWNER, DAC_OVERRIDE) in a namespace of its own; pods in {NAMESPACE} never do",
        f"if it fails: `kubectl logs -n {ADMIN_NAMESPACE} job/{JOB}` says why (an NFS server with root_squash "
        f"refuses root: run the README's server-side commands there), then `kubectl delete namespace "
        f"{ADMIN_NAMESPACE}`",
    ]
    return Plan(title, steps, checks=[kubeconfig_problem], notes=notes)
