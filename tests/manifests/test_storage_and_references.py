"""Shared storage, and every name a pod refers to exists in the same render."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from kustomize_helpers import containers, pod_specs
from pod_security import restricted_violations

from k8s_tasks.overlays import ENVS, find, one, parse, render


def _gi(quantity: str) -> float:
    units = {"Gi": 1, "Ti": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


@pytest.mark.parametrize("overlay", ENVS)
def test_storage_is_a_200gi_read_write_many_claim_on_nfs(overlay: str, docs: dict) -> None:
    claim = one(docs[overlay], "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "llama-storage"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _gi(claim["spec"]["resources"]["requests"]["storage"]) >= 200
    volume = one(docs[overlay], "PersistentVolume")
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert claim["spec"]["storageClassName"] == volume["spec"]["storageClassName"] == ""
    assert volume["spec"]["claimRef"] == {"namespace": "llm-training", "name": "llama-storage"}
    assert volume["spec"]["accessModes"] == ["ReadWriteMany"]
    assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    nfs = volume["spec"]["nfs"]
    assert nfs["server"] != "nfs-server.invalid" and nfs["path"] != "/set-by-overlay", "overlay must set NFS"
    for name, spec in pod_specs(docs[overlay]):
        claims = {
            v["name"]
            for v in spec["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == "llama-storage"
        }
        for c in containers(spec):
            assert [m["mountPath"] for m in c["volumeMounts"] if m["name"] in claims] == ["/storage"], name


@pytest.mark.parametrize("overlay", ENVS)
def test_every_reference_resolves(overlay: str, docs: dict) -> None:
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs[overlay]}

    def data_keys(kind: str, name: str) -> set[str]:
        assert (kind, name) in objects, f"{kind} {name} is referred to but not rendered"
        return set(objects[(kind, name)].get("data") or {})

    checked = 0
    for workload, spec in pod_specs(docs[overlay]):
        assert ("ServiceAccount", spec["serviceAccountName"]) in objects, workload
        for volume in spec["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in objects
            if "configMap" in volume:
                data_keys("ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                data_keys("Secret", volume["secret"]["secretName"])
        for c in containers(spec):
            for source in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in source:
                        data_keys(kind, source[key]["name"])
                        checked += 1
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in ref:
                        assert ref[key]["key"] in data_keys(kind, ref[key]["name"]), (
                            f"{workload} {env['name']}"
                        )
                        checked += 1
    assert checked >= 8, "fewer references than the three workloads carry: did the walk miss them?"
    for claim in find(docs[overlay], "PersistentVolumeClaim"):
        if claim["spec"].get("volumeName"):
            assert ("PersistentVolume", claim["spec"]["volumeName"]) in objects


@pytest.mark.parametrize("overlay", ENVS)
def test_filestore_component_can_be_enabled_in_each_shipped_overlay(overlay: str, manifest_tree: Path,
                                                                    tmp_path: Path) -> None:
    """As components/filestore says: add it to an overlay's `components:`, before job-identity, and change nothing
    else (the overlay's NFS volume patch stays, patching by target what is no longer there)."""
    tree = tmp_path / "tree"
    shutil.copytree(manifest_tree, tree, ignore=shutil.ignore_patterns("render-*.yaml", "filestore-example"))
    kustomization = tree / "overlays" / overlay / "kustomization.yaml"
    data = yaml.safe_load(kustomization.read_text())
    assert any(p["path"] == "patches/persistentvolume.nfs-server.yaml" for p in data["patches"])
    components = data["components"]
    components.insert(components.index("../../components/job-identity"), "../../components/filestore")
    kustomization.write_text(yaml.safe_dump(data, sort_keys=False))
    docs = parse(render(kustomization.parent))
    assert not find(docs, "PersistentVolume")
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "llama-storage"
    assert claim["spec"]["storageClassName"] == "standard-rwx"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "volumeName" not in claim["spec"]
    assert _gi(claim["spec"]["resources"]["requests"]["storage"]) >= 1024, "Basic HDD's minimum is 1 TiB"
    for name, spec in pod_specs(docs):
        assert restricted_violations(spec) == [], name
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["llama-storage"], name
