"""`invoke prepare-storage`: the plan against the fake cluster surface: the export the claim is bound to (an NFS
volume, a Filestore share), the deployed image, the directories the configuration names; refused without a
Bound claim."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from invoke.exceptions import Exit
from k8s_fake_cluster import FakeCluster
from k8s_task_objects import DEPLOYED, bound, deployed

from k8s_tasks.overlays import one
from k8s_tasks.plan import run_plan
from k8s_tasks.storage_owner import plan_prepare_storage


def _job(plan_stdin: str) -> dict:
    return one([d for d in yaml.safe_load_all(plan_stdin) if d], "Job")


def test_the_plan_mounts_the_bound_nfs_export_as_root_in_its_own_namespace(tree: Path) -> None:
    cluster = FakeCluster(bound(deployed("gpu", tree)))
    plan = plan_prepare_storage("gpu", cluster, root=tree)
    assert plan.commands() == [
        ["kubectl", "apply", "-f", "-"],
        ["kubectl", "logs", "--follow", "--pod-running-timeout=10m", "-n", "llm-storage-admin",
         "job/llama-storage-owner"],
        ["kubectl", "wait", "--for=condition=complete", "--timeout=60s", "-n", "llm-storage-admin",
         "job/llama-storage-owner"],
        ["kubectl", "delete", "namespace", "llm-storage-admin", "--wait=false"],
    ]
    docs = [d for d in yaml.safe_load_all(plan.steps[0].stdin) if d]
    assert [(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs] == [
        ("Namespace", "llm-storage-admin", None), ("NetworkPolicy", "default-deny", "llm-storage-admin"),
        ("Job", "llama-storage-owner", "llm-storage-admin")]
    pod = _job(plan.steps[0].stdin)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == str(DEPLOYED["gpu"])
    assert {e["name"]: e["value"] for e in container["env"]} == {
        "EXPORT": "/export", "OWNER": "10001", "DIRECTORIES": "data models output webui", "RECURSIVE": "0"}
    assert pod["volumes"] == [{"name": "export", "nfs": {"server": "10.0.0.2", "path": "/llama-storage"}}]
    assert plan.title == (
        "prepare the storage of overlays/gpu in kube context fake-context: a root Job in namespace llm-storage-admin "
        "mounts 10.0.0.2:/llama-storage and hands data/, models/, output/, webui/ and the export's root to UID/GID "
        "10001 (mode 775), the directories themselves (files inside keep their owner)")
    out = io.StringIO()
    run_plan(plan, dry_run=True, out=out, root=tree)
    assert "note: it runs as root (CHOWN, FOWNER, DAC_OVERRIDE) in a namespace of its own" in out.getvalue()
    # The manifest is shown under --dry-run, its script as written.
    assert "|           server: 10.0.0.2\n" in out.getvalue()
    assert "|           for d in $DIRECTORIES; do mkdir -p \"$d\"; done\n" in out.getvalue()


def test_a_filestore_share_and_recursive_hand_over(tree: Path) -> None:
    objects = bound(deployed("dev", tree))
    for doc in objects:
        if doc["kind"] == "PersistentVolume":
            doc["spec"].pop("nfs")
            doc["spec"]["csi"] = {"driver": "filestore.csi.storage.gke.io",
                                  "volumeHandle": "modeInstance/europe-west4-a/pvc-1234/vol1",
                                  "volumeAttributes": {"ip": "10.93.0.2", "volume": "vol1"}}
    plan = plan_prepare_storage("dev", FakeCluster(objects), recursive=True, root=tree)
    pod = _job(plan.steps[0].stdin)["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "export", "nfs": {"server": "10.93.0.2", "path": "/vol1"}}]
    assert {e["name"]: e["value"] for e in pod["containers"][0]["env"]}["RECURSIVE"] == "1"
    assert plan.title.endswith("everything below them")


def test_an_unbound_claim_is_refused_with_what_to_run(tree: Path) -> None:
    objects = deployed("gpu", tree)
    for doc in objects:
        if doc["kind"] == "PersistentVolumeClaim":
            doc["status"] = {"phase": "Pending"}
    with pytest.raises(Exit, match="the storage claim llama-storage is Pending, bound to no volume: `invoke deploy "
                                   "--env=gpu` first; `invoke doctor --env=gpu` says why it does not bind"):
        plan_prepare_storage("gpu", FakeCluster(objects), root=tree)


def test_nothing_deployed_is_refused(tree: Path) -> None:
    with pytest.raises(Exit, match="nothing is deployed for train Jobs"):
        plan_prepare_storage("gpu", FakeCluster([]), root=tree)
