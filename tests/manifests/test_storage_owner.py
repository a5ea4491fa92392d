"""admin/storage-owner, the root Job of `invoke prepare-storage`: valid Kubernetes, loosened from "restricted" in
exactly what chown needs and nothing else, bounded in time, alone in a namespace that denies all traffic; and its
script, run for real on a local export, hands the directories to UID/GID 10001 (checkov: test_checkov.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pod_security import restricted_violations

from k8s_tasks.overlays import find, one, parse, render
from k8s_tasks.storage_owner import ADMIN_DIR, ADMIN_NAMESPACE, OWNER
from k8s_tasks.validate import K8S_MINORS


@pytest.fixture(scope="module")
def admin(manifest_tree: Path) -> list[dict[str, Any]]:
    return parse(render(manifest_tree / ADMIN_DIR))


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Job")["spec"]["template"]["spec"]


def test_it_is_loosened_from_restricted_only_where_chown_needs_it(admin: list[dict[str, Any]]) -> None:
    assert sorted(restricted_violations(_pod(admin))) == sorted([
        "volume export has type ['nfs']",  # mounts the export itself: the claim is bound in llm-training
        "pod runAsUser is 0",
        "chown: adds capabilities ['CHOWN', 'FOWNER', 'DAC_OVERRIDE']",
        "chown: runAsNonRoot is not true (pod or container)",
    ])
    (container,) = _pod(admin)["containers"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_it_runs_alone_in_a_baseline_namespace_that_denies_all_traffic(admin: list[dict[str, Any]]) -> None:
    namespace = one(admin, "Namespace")
    assert namespace["metadata"]["name"] == ADMIN_NAMESPACE != "llm-training"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
    assert {d["metadata"].get("namespace") for d in admin if d["kind"] != "Namespace"} == {ADMIN_NAMESPACE}
    (policy,) = find(admin, "NetworkPolicy")
    assert policy["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    job = one(admin, "Job")["spec"]
    assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] <= 900 and job["ttlSecondsAfterFinished"]
    assert _pod(admin)["automountServiceAccountToken"] is False


@pytest.mark.parametrize("minor", K8S_MINORS)
def test_it_is_valid_kubernetes(minor: str, admin: list[dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "storage-owner.yaml"
    path.write_text(yaml.safe_dump_all(admin))
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", minor,
                             str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubernetes-validate --strict -k {minor}:\n{result.stdout}{result.stderr}"


def _run_script(admin: list[dict[str, Any]], export: Path, recursive: str) -> subprocess.CompletedProcess:
    (container,) = _pod(admin)["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    env.update(EXPORT=str(export), RECURSIVE=recursive, PATH=os.environ["PATH"])
    return subprocess.run(container["command"], env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                    reason="chown to another user needs root (CI runs as root)")
def test_the_script_hands_the_directories_to_the_pods_user(admin: list[dict[str, Any]], tmp_path: Path) -> None:
    export = tmp_path / "export"
    (export / "output" / "lora-adapter").mkdir(parents=True)
    earlier = export / "output" / "lora-adapter" / "adapter_model.safetensors"  # written as root before
    earlier.write_bytes(b"x")
    result = _run_script(admin, export, "0")
    assert result.returncode == 0, result.stderr
    for directory in (export, *(export / d for d in ("models", "output", "data", "webui"))):
        info = directory.stat()
        assert (info.st_uid, info.st_gid) == (int(OWNER), int(OWNER)), directory
        assert stat.S_IMODE(info.st_mode) == 0o775, directory
    assert earlier.stat().st_uid == os.geteuid()  # not recursive: what is inside keeps its owner
    assert _run_script(admin, export, "1").returncode == 0
    assert earlier.stat().st_uid == int(OWNER)
    assert "drwxrwxr-x" in result.stdout  # it shows what it did
