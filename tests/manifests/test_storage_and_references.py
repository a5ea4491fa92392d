"""Shared storage, and every name a pod refers to exists in the same render."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_filestore_component_switches_to_a_dynamic_rwx_class(manifest_tree: Path) -> None:
    """An overlay can swap the external NFS for GKE Filestore by adding components/filestore."""
    overlay = manifest_tree / "overlays" / "filestore-example"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources:\n  - ../gpu\ncomponents:\n  - ../../components/filestore\n"
    )
    docs = parse(render(overlay))
    assert not find(docs, "PersistentVolume")
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "llama-storage"
    assert claim["spec"]["storageClassName"] == "standard-rwx"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "volumeName" not in claim["spec"]
    assert _gi(claim["spec"]["resources"]["requests"]["storage"]) >= 1024, (
        "Filestore's smallest tier is 1 TiB"
    )
    for name, spec in pod_specs(docs):
        assert restricted_violations(spec) == [], name
