"""Pod Security "restricted", least privilege and no exposure, on every rendered pod template."""

from __future__ import annotations

import copy

import pytest
from kustomize_helpers import containers, env_of, pod_specs, uses_component
from pod_security import restricted_violations

from k8s_tasks.overlays import ENVS, find, one
from k8s_tasks.sizing import gib


@pytest.mark.parametrize("overlay", ENVS)
def test_every_pod_template_passes_pod_security_restricted(overlay: str, docs: dict) -> None:
    specs = list(pod_specs(docs[overlay]))
    assert {name.split("/")[0] for name, _ in specs} == {"Deployment", "Job"}
    for name, spec in specs:
        assert restricted_violations(spec) == [], name


BREAKAGES = {
    "inline nfs volume": lambda s: s["volumes"].append({"name": "x", "nfs": {"server": "a", "path": "/"}}),
    "hostPath volume": lambda s: s["volumes"].append({"name": "x", "hostPath": {"path": "/"}}),
    "hostNetwork": lambda s: s.update(hostNetwork=True),
    "privileged": lambda s: s["containers"][0]["securityContext"].update(privileged=True),
    "privilege escalation": lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
    "capabilities kept": lambda s: s["containers"][0]["securityContext"].pop("capabilities"),
    "capability added": lambda s: s["containers"][0]["securityContext"]["capabilities"].update(
        add=["SYS_ADMIN"]
    ),
    "root allowed": lambda s: [
        s["securityContext"].pop("runAsNonRoot"),
        s["containers"][0]["securityContext"].pop("runAsNonRoot"),
    ],
    "uid 0": lambda s: s["containers"][0]["securityContext"].update(runAsUser=0),
    "seccomp unconfined": lambda s: s["containers"][0]["securityContext"].update(
        seccompProfile={"type": "Unconfined"}
    ),
    "seccomp missing": lambda s: [
        s["securityContext"].pop("seccompProfile"),
        s["containers"][0]["securityContext"].pop("seccompProfile"),
    ],
    "hostPort": lambda s: (
        s["containers"][0].setdefault("ports", []).append({"containerPort": 1, "hostPort": 1})
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_checker_refuses_what_admission_refuses(breakage: str, docs: dict) -> None:
    spec = copy.deepcopy(one(docs["gpu"], "Job", "train")["spec"]["template"]["spec"])
    assert restricted_violations(spec) == []
    BREAKAGES[breakage](spec)
    assert restricted_violations(spec), f"{breakage} was not detected"


@pytest.mark.parametrize("overlay", ENVS)
def test_namespace_enforces_restricted(overlay: str, docs: dict) -> None:
    namespace = one(docs[overlay], "Namespace")
    assert namespace["metadata"]["name"] == "llm-training"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    namespaced = [d for d in docs[overlay] if d["kind"] not in ("Namespace", "PersistentVolume")]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"llm-training"}


@pytest.mark.parametrize("overlay", ENVS)
def test_pods_run_as_unprivileged_user_on_read_only_root(overlay: str, docs: dict) -> None:
    assert one(docs[overlay], "ServiceAccount")["automountServiceAccountToken"] is False
    for name, spec in pod_specs(docs[overlay]):
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["serviceAccountName"] == "llama-factory", name
        assert spec["securityContext"]["runAsUser"] >= 10000, name
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["runAsUser"] >= 10000 and sc["runAsGroup"] >= 10000, name
            assert sc["readOnlyRootFilesystem"] is True, name
            # Every path the image writes is a volume: /tmp and HOME (caches).
            volumes = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
            assert "emptyDir" in mounts["/tmp"] and "emptyDir" in mounts["/home/app"], name
            assert "persistentVolumeClaim" in mounts["/storage"], name
            env = env_of(c)
            for var in ("HF_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR"):
                assert env[var].startswith("/home/app/"), f"{name}: {var}"
            for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
                assert env[var] == "1", f"{name}: {var}"


@pytest.mark.parametrize("overlay", ENVS)
def test_every_container_has_cpu_and_memory_requests_and_limits(overlay: str, docs: dict) -> None:
    for name, spec in pod_specs(docs[overlay]):
        for c in containers(spec):
            resources = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{name}/{c['name']} {kind}"
            if name.startswith("Job/llama-merge-"):
                # The merge requests what it holds while it waits, and bursts to its limit once it merges
                # (test_sizing.py); an eviction above its request is retried without counting.
                assert gib(resources["requests"]["memory"]) < gib(resources["limits"]["memory"]), name
                continue
            # Memory request == limit: the kernel never kills a training pod for memory it was promised.
            assert resources["requests"]["memory"] == resources["limits"]["memory"], name


@pytest.mark.parametrize("overlay", ENVS)
def test_nothing_is_exposed_outside_the_cluster(overlay: str, docs: dict) -> None:
    kinds = {d["kind"] for d in docs[overlay]}
    assert not kinds & {"Ingress", "Gateway", "HTTPRoute", "Route"}
    for service in find(docs[overlay], "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert not service["spec"].get("externalIPs")
    for doc in docs[overlay]:
        assert "GRADIO_SHARE" not in (doc.get("data") or {})
    for name, spec in pod_specs(docs[overlay]):
        for c in containers(spec):
            assert "GRADIO_SHARE" not in env_of(c), name


@pytest.mark.parametrize("overlay", ENVS)
def test_network_policies_deny_by_default_and_allow_only_what_is_needed(overlay: str, docs: dict) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs[overlay], "NetworkPolicy")}
    deny = policies.pop("default-deny")
    assert deny["podSelector"] == {} and sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny and "egress" not in deny

    webui = policies.pop("allow-ingress-webui")
    assert webui["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "webui"
    for rule in webui["ingress"]:
        # Only pods of this namespace: no namespaceSelector, no ipBlock.
        assert [set(peer) for peer in rule["from"]] == [{"podSelector"}]
        assert [p["port"] for p in rule["ports"]] == ["http"]

    # Between training pods only, on every port (the process group's ports are picked by the kernel).
    nodes = policies.pop("allow-train-nodes", None)
    assert (nodes is not None) == uses_component(overlay, "multinode")
    if nodes is not None:
        train = {"app.kubernetes.io/name": "llama-factory", "app.kubernetes.io/component": "train"}
        assert nodes["podSelector"] == {"matchLabels": train}
        assert sorted(nodes["policyTypes"]) == ["Egress", "Ingress"]
        assert nodes["ingress"] == [{"from": [{"podSelector": {"matchLabels": train}}]}]
        assert nodes["egress"] == [{"to": [{"podSelector": {"matchLabels": train}}]}]

    # The egress rules (DNS, MLflow) are checked by where they let the pods connect: test_network_policies.py.
    assert sorted(policies) == ["allow-egress-dns", "allow-egress-mlflow"]
    for name, spec in policies.items():
        assert spec["policyTypes"] == ["Egress"] and "ingress" not in spec, name
        for rule in spec["egress"]:
            assert rule["ports"], f"{name}: an egress rule without ports allows everything"
