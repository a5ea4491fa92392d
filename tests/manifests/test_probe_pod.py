"""The doctor's probe pod (k8s_tasks/probe_pod.py), made from each overlay's rendered training Job: it passes what
every rendered workload passes (kubernetes-validate --strict, checkov, Pod Security "restricted"), it is the
training pod in everything but the GPU, and the same NetworkPolicies select it, so it reaches what training
reaches and nothing more."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from network_policy import egress_allowed, pod, selects
from pod_security import restricted_violations
from test_checkov import ALLOWED_SKIPS
from test_network_policies import KUBE_DNS, MLFLOW_POD

from k8s_tasks.overlays import ENVS, find, one
from k8s_tasks.probe_pod import COMMAND, LABEL, probe_pod
from k8s_tasks.tools import require_tool
from k8s_tasks.validate import K8S_MINORS

NAME = "llama-probe-20260102-030405"


def _probe(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return probe_pod(one(docs, "Job", "train"), NAME, deadline_seconds=600)


@pytest.mark.parametrize("overlay", ENVS)
def test_the_probe_is_the_training_pod_without_its_gpu(overlay: str, docs: dict) -> None:
    train = one(docs[overlay], "Job", "train")["spec"]["template"]
    probe = _probe(docs[overlay])
    spec, (container,) = probe["spec"], probe["spec"]["containers"]
    (trainer,) = train["spec"]["containers"]
    assert container["command"] == COMMAND == ["python", "-m", "entrypoint", "probe"]
    for key in ("image", "imagePullPolicy", "env", "envFrom", "securityContext"):
        assert container[key] == trainer[key], key
    for key in ("securityContext", "serviceAccountName", "automountServiceAccountToken", "tolerations"):
        assert spec[key] == train["spec"][key], key
    assert "nvidia.com/gpu" not in str(container["resources"]) and "nodeSelector" not in spec
    assert [v for v in spec["volumes"]] == [v for v in train["spec"]["volumes"] if v["name"] != "dshm"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/storage", "/tmp", "/home/app"}
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] == 600
    assert "subdomain" not in spec  # a multi-node Job's headless Service: the probe is no node of it
    assert probe["metadata"]["labels"] == {**train["metadata"]["labels"], LABEL: "true"}


@pytest.mark.parametrize("overlay", ENVS)
def test_the_probe_passes_pod_security_restricted(overlay: str, docs: dict) -> None:
    assert restricted_violations(_probe(docs[overlay])["spec"]) == []


@pytest.mark.parametrize("minor", K8S_MINORS)
def test_the_probe_pods_are_valid_kubernetes(minor: str, docs: dict, tmp_path: Path) -> None:
    files = []
    for overlay in ENVS:
        path = tmp_path / f"probe-{overlay}.yaml"
        path.write_text(yaml.safe_dump(_probe(docs[overlay])))
        files.append(str(path))
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", minor, *files],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubernetes-validate --strict -k {minor}:\n{result.stdout}{result.stderr}"


@pytest.fixture(scope="module")
def checkov_results(docs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """checkov over each overlay's probe pod with that overlay's namespace and NetworkPolicies beside it (its
    graph check wants a policy that selects every pod)."""
    results = {}
    for overlay in ENVS:
        folder = tmp_path_factory.mktemp(f"probe-{overlay}")
        objects = [one(docs[overlay], "Namespace"), *find(docs[overlay], "NetworkPolicy"), _probe(docs[overlay])]
        (folder / "probe.yaml").write_text(yaml.safe_dump_all(objects))
        result = subprocess.run(
            [require_tool("checkov"), "-d", str(folder), "--framework", "kubernetes", "--skip-download", "--output",
             "json"], capture_output=True, text=True, timeout=300, check=False, env=dict(os.environ))
        assert result.stdout.strip(), f"checkov printed no report:\n{result.stderr[-3000:]}"
        report = json.loads(result.stdout)
        (results[overlay],) = [r for r in (report if isinstance(report, list) else [report])
                               if r.get("check_type") == "kubernetes"]
    return results


@pytest.mark.parametrize("overlay", ENVS)
def test_checkov_passes_the_probe_pod_with_the_training_jobs_skips(overlay: str, checkov_results: dict) -> None:
    results = checkov_results[overlay]["results"]
    probe = f"Pod.llm-training.{NAME}"
    assert any(c["resource"] == probe for c in results["passed_checks"]), "checkov did not scan the probe pod"
    assert [f"{c['check_id']} {c['resource']}" for c in results["failed_checks"]] == []
    skipped = {c["check_id"] for c in results["skipped_checks"] if c["resource"] == probe}
    # The training Job's skips (its container's), and the health probes a pod that runs to completion has not.
    assert skipped == {check for check, where in ALLOWED_SKIPS.items() if overlay in where} | {"CKV_K8S_8",
                                                                                             "CKV_K8S_9"}
    for check in results["skipped_checks"]:
        assert len(check["check_result"].get("suppress_comment", "")) > 40, check["check_id"]


@pytest.mark.parametrize("overlay", ENVS)
def test_the_same_network_policies_select_the_probe_and_training(overlay: str, docs: dict) -> None:
    policies = find(docs[overlay], "NetworkPolicy")
    train = one(docs[overlay], "Job", "train")["spec"]["template"]["metadata"]["labels"]
    probe = _probe(docs[overlay])["metadata"]["labels"]

    def selecting(labels: dict[str, str]) -> list[str]:
        return [p["metadata"]["name"] for p in policies if selects(p["spec"]["podSelector"], labels)]

    assert selecting(probe) == selecting(train)
    assert "default-deny" in selecting(probe)
    for target in (pod("mlflow", MLFLOW_POD, 5000), pod("kube-system", KUBE_DNS, 53, "UDP"),
                   pod("default", {"app": "anything"}, 443)):
        assert egress_allowed(policies, probe, target) == egress_allowed(policies, train, target), target
