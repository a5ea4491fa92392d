"""Where the pods may connect, decided as GKE Dataplane V2 (Cilium) decides it (network_policy.py): the cluster's
DNS only, the overlay's MLflow server wherever mlflow.env says it is, and nothing written for NFS, which the
kubelet mounts from the node's network."""

from __future__ import annotations

import copy
import ipaddress

import pytest
from kustomize_helpers import pod_specs
from network_policy import Outside, egress_allowed, pod

from k8s_tasks.overlays import ENVS, find, one
from k8s_tasks.tools import REPO
from k8s_tasks.ui import in_cluster_service

KUBE_DNS = {"k8s-app": "kube-dns"}
NODE_LOCAL_DNS = {"k8s-app": "node-local-dns"}
# The labels a MLflow chart's pods carry (community-charts/mlflow): what the examples select.
MLFLOW_POD = {"app.kubernetes.io/name": "mlflow", "app.kubernetes.io/instance": "mlflow"}
NFS_PORTS = {111, 2049, 20048}


def _policies(docs: list[dict]) -> list[dict]:
    return find(docs, "NetworkPolicy")


def _pod_labels(docs: list[dict]) -> dict[str, dict[str, str]]:
    """The labels of every workload's pods: what the policies select them by."""
    out = {}
    for doc in docs:
        if doc["kind"] in ("Job", "Deployment"):
            out[doc["metadata"]["name"]] = doc["spec"]["template"]["metadata"]["labels"]
    assert len(out) == 3 and len(out) == len(list(pod_specs(docs)))
    return out


def _tracking_uri(overlay: str) -> str:
    lines = (REPO / "overlays" / overlay / "mlflow.env.example").read_text().splitlines()
    return next(line.split("=", 1)[1] for line in lines if line.startswith("MLFLOW_TRACKING_URI="))


@pytest.mark.parametrize("overlay", ENVS)
def test_every_pod_resolves_names_through_the_clusters_dns_only(overlay: str, docs: dict) -> None:
    policies = _policies(docs[overlay])
    for workload, labels in _pod_labels(docs[overlay]).items():
        for protocol in ("UDP", "TCP"):
            # kube-dns, and NodeLocal DNSCache: its pod under Dataplane V2, its link-local address elsewhere.
            assert egress_allowed(policies, labels, pod("kube-system", KUBE_DNS, 53, protocol)), workload
            assert egress_allowed(policies, labels, pod("kube-system", NODE_LOCAL_DNS, 53, protocol)), workload
            assert egress_allowed(policies, labels, Outside("169.254.20.10", 53, protocol)), workload
            # Not any resolver: no public one, no other pod of kube-system, no other port of kube-dns.
            assert not egress_allowed(policies, labels, Outside("8.8.8.8", 53, protocol)), workload
            assert not egress_allowed(policies, labels, pod("kube-system", {"k8s-app": "metrics"}, 53, protocol))
            assert not egress_allowed(policies, labels, pod("default", KUBE_DNS, 53, protocol)), workload
        assert not egress_allowed(policies, labels, pod("kube-system", KUBE_DNS, 9153)), workload


@pytest.mark.parametrize("overlay", ENVS)
def test_every_pod_reaches_the_mlflow_server_its_overlay_names(overlay: str, docs: dict) -> None:
    """The example's MLflow (mlflow.env.example) is reachable from every pod as Cilium decides: an in-cluster
    server by namespace and pod labels (an address would never match it), an outside one by address and port."""
    policies = _policies(docs[overlay])
    uri = _tracking_uri(overlay)
    service = in_cluster_service(uri)
    rule = one([p for p in policies if p["metadata"]["name"] == "allow-egress-mlflow"], "NetworkPolicy")
    peers = [peer for r in rule["spec"]["egress"] for peer in r["to"]]
    for workload, labels in _pod_labels(docs[overlay]).items():
        if service is not None:
            namespace, _, port = service
            assert egress_allowed(policies, labels, pod(namespace, MLFLOW_POD, port)), workload
            # Only that server: not another pod of its namespace, not the same labels in another namespace.
            assert not egress_allowed(policies, labels, pod(namespace, {"app.kubernetes.io/name": "db"}, port))
            assert not egress_allowed(policies, labels, pod("default", MLFLOW_POD, port)), workload
            assert all("ipBlock" not in peer for peer in peers), "an ipBlock never matches an in-cluster server"
        else:
            assert uri.startswith("https://"), uri
            assert all(set(peer) == {"ipBlock"} for peer in peers), "a server outside the cluster: by address"
            for peer in peers:
                inside = str(next(ipaddress.ip_network(peer["ipBlock"]["cidr"]).hosts()))
                assert egress_allowed(policies, labels, Outside(inside, 443)), workload
                assert not egress_allowed(policies, labels, Outside(inside, 22)), workload
            assert not egress_allowed(policies, labels, pod("mlflow", MLFLOW_POD, 5000)), workload


def test_the_example_in_cluster_uri_is_the_default_of_the_example_overlays() -> None:
    for overlay in ("dev", "gpu", "multinode"):
        assert in_cluster_service(_tracking_uri(overlay)) == ("mlflow", "mlflow", 5000), overlay
    assert in_cluster_service(_tracking_uri("prod")) is None


def test_an_address_rule_cannot_reach_an_in_cluster_server(docs: dict) -> None:
    """Why the MLflow rule names namespace and pods: the same rule by address (the original design's private
    ranges) lets nothing through to the in-cluster server under Dataplane V2, and every run would exit 75."""
    policies = copy.deepcopy(_policies(docs["gpu"]))
    rule = next(p for p in policies if p["metadata"]["name"] == "allow-egress-mlflow")
    rule["spec"]["egress"] = [{"to": [{"ipBlock": {"cidr": c}} for c in ("10.0.0.0/8", "172.16.0.0/12",
                                                                          "192.168.0.0/16")],
                               "ports": [{"protocol": "TCP", "port": 5000}]}]
    labels = _pod_labels(docs["gpu"])
    assert not any(egress_allowed(policies, lb, pod("mlflow", MLFLOW_POD, 5000)) for lb in labels.values())


@pytest.mark.parametrize("overlay", ENVS)
def test_no_rule_is_written_for_nfs_which_the_kubelet_mounts(overlay: str, docs: dict) -> None:
    """The kubelet mounts the NFS volume from the node's network, outside any pod policy: the pods send no NFS
    packet, so a rule for NFS could match nothing. The storage reaches the pods only as a mounted claim."""
    for policy in _policies(docs[overlay]):
        for rule in policy["spec"].get("egress") or []:
            ports = {p.get("port") for p in rule.get("ports") or []}
            assert not ports & NFS_PORTS, policy["metadata"]["name"]
    server = one(docs[overlay], "PersistentVolume")["spec"]["nfs"]["server"]
    for workload, labels in _pod_labels(docs[overlay]).items():
        assert not egress_allowed(_policies(docs[overlay]), labels, Outside(server, 2049)), workload
    for name, spec in pod_specs(docs[overlay]):
        assert not any("nfs" in volume for volume in spec["volumes"]), f"{name}: NFS only through the claim"
