"""Where a pod may connect under the rendered NetworkPolicies, as GKE Dataplane V2 (Cilium) decides it, offline.

Cilium matches an `ipBlock` only against addresses outside the cluster: never a pod, nor the pod behind an
in-cluster Service (cilium issues 9209, 19601, 35212). Pods and Services of the cluster are reached only through
`namespaceSelector`/`podSelector` peers, and policy sees a Service connection after its address was translated
to a backend pod's, so the port that counts is the pod's. Policies add up: a connection is allowed when no
policy isolates the pod for egress, or when one rule of one policy selecting it allows it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

NAMESPACE = "llm-training"


@dataclasses.dataclass(frozen=True)
class Pod:
    """A destination in the cluster: a pod (or the pod behind a Service) with its namespace, labels, port."""

    namespace: str
    labels: tuple[tuple[str, str], ...]
    port: int
    protocol: str = "TCP"


@dataclasses.dataclass(frozen=True)
class Outside:
    """A destination outside the cluster, by address."""

    address: str
    port: int
    protocol: str = "TCP"


def pod(namespace: str, labels: dict[str, str], port: int, protocol: str = "TCP") -> Pod:
    return Pod(namespace, tuple(sorted(labels.items())), port, protocol)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) against a set of labels; {} selects everything."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        present = key in labels
        if not {"In": present and labels[key] in values, "NotIn": not present or labels[key] not in values,
                "Exists": present, "DoesNotExist": not present}[operator]:
            return False
    return True


def _peer_allows(peer: dict[str, Any], target: Pod | Outside) -> bool:
    if "ipBlock" in peer:
        if not isinstance(target, Outside):
            return False  # Cilium: never for pods or Service backends
        address = ipaddress.ip_address(target.address)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", []))
    if isinstance(target, Outside):
        return False
    # The namespace's automatic label is kubernetes.io/metadata.name; no namespaceSelector: the policy's own.
    namespace_selector = peer.get("namespaceSelector")
    if namespace_selector is None:
        in_namespace = target.namespace == NAMESPACE
    else:
        in_namespace = selects(namespace_selector, {"kubernetes.io/metadata.name": target.namespace})
    return in_namespace and selects(peer.get("podSelector") or {}, dict(target.labels))


def _port_allows(port: dict[str, Any], target: Pod | Outside) -> bool:
    if port.get("protocol", "TCP") != target.protocol:
        return False
    if "port" not in port:
        return True
    if not isinstance(port["port"], int):
        return False  # a named port: only the destination pod's own names could match, never in an egress rule
    return port["port"] <= target.port <= port.get("endPort", port["port"])


def egress_allowed(policies: list[dict[str, Any]], source_labels: dict[str, str], target: Pod | Outside) -> bool:
    """Whether a pod of this namespace with these labels may open a connection to the target."""
    isolating = [p["spec"] for p in policies if "Egress" in p["spec"].get("policyTypes", [])
                 and selects(p["spec"]["podSelector"], source_labels)]
    if not isolating:
        return True
    return any(
        (not rule.get("to") or any(_peer_allows(peer, target) for peer in rule["to"]))
        and (not rule.get("ports") or any(_port_allows(port, target) for port in rule["ports"]))
        for spec in isolating for rule in spec.get("egress") or [])
