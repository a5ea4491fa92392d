"""A FAKE of the Kubernetes API for the task tests: no API server runs here.

It holds the kubernetes client's own model objects (V1Job, V1Pod, ...), built from plain manifests by the
client's deserializer, so the code under test reads the same attributes it reads from a real cluster; Kueue's
objects (LocalQueue, Workload) stay plain dicts, as the client's custom-objects API returns them. It answers
only the calls of k8s_tasks.cluster.Cluster; label selectors are equality-only (all the tasks use).
A timeline of snapshots lets a test move the cluster forward each time the code under test sleeps; a pod the
code creates (the doctor's probe) goes through the states a test's `probe` function gives for its manifest, one
per sleep. `denied` names calls the API server refuses (RBAC), as KubeCluster raises it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from typing import Any

from invoke.exceptions import Exit
from kubernetes.client import ApiClient

from k8s_tasks.cluster import ApiDenied, ApiUnreachable

_API = ApiClient()
_MODELS = {"Job": "V1Job", "Pod": "V1Pod", "Deployment": "V1Deployment", "ConfigMap": "V1ConfigMap",
           "Secret": "V1Secret", "PersistentVolumeClaim": "V1PersistentVolumeClaim",
           "ServiceAccount": "V1ServiceAccount", "Service": "V1Service", "Node": "V1Node",
           "DaemonSet": "V1DaemonSet", "Namespace": "V1Namespace", "PersistentVolume": "V1PersistentVolume",
           "Event": "CoreV1Event"}
CUSTOM_KINDS = ("LocalQueue", "Workload")
# What a test's probe function returns for the created pod's manifest: its states, one per sleep of the code under
# test (the last one stays), and its log.
Probe = Callable[[dict[str, Any]], tuple[list[dict[str, Any]], list[str]]]


class _Response:  # what ApiClient.deserialize reads
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = json.dumps(data, default=str)


def model(manifest: dict[str, Any]) -> Any:
    """The client's model object for a manifest (dates and nested types parsed as from the API server)."""
    if manifest["kind"] in CUSTOM_KINDS:
        return manifest
    return _API.deserialize(_Response(manifest), _MODELS[manifest["kind"]])


def _kind(obj: Any) -> str:
    return obj["kind"] if isinstance(obj, dict) else type(obj).__name__


def _name(obj: Any) -> str:
    return obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name


def _matches(obj: Any, selector: str) -> bool:
    labels = (obj["metadata"].get("labels") if isinstance(obj, dict) else obj.metadata.labels) or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeCluster:
    def __init__(self, *snapshots: list[dict[str, Any]], logs: dict[str, list[str]] | None = None,
                 trainer_log: str = "", namespace: str = "llm-training", context: str = "fake-context",
                 version: tuple[int, int, str] = (1, 33, "v1.33.5-gke.1162000"), denied: Collection[str] = (),
                 unreachable: bool = False, probe: Probe | None = None) -> None:
        self.namespace = namespace
        self.context = context
        self.timeline = [[model(m) for m in snapshot] for snapshot in snapshots] or [[]]
        self.logs = logs or {}
        self.trainer_log = trainer_log
        self.version = version
        self.denied = set(denied)
        self.unreachable = unreachable
        self.probe = probe
        self.created: list[dict[str, Any]] = []  # manifests of the pods the code created
        self.deleted: list[str] = []
        self._states: dict[str, list[Any]] = {}  # created pods: their states still to come, the current first

    @property
    def objects(self) -> list[Any]:
        return self.timeline[0] + [states[0] for states in self._states.values()]

    def advance(self, _seconds: float = 0) -> None:
        """Move to the next snapshot (used as the `sleep` of the code under test); stay on the last one."""
        if len(self.timeline) > 1:
            self.timeline.pop(0)
        for states in self._states.values():
            if len(states) > 1:
                states.pop(0)

    def _guard(self, call: str) -> None:
        if self.unreachable:
            raise ApiUnreachable(f"cannot reach the cluster of kube context {self.context}: "
                                 "HTTPSConnectionPool(host='10.0.0.1', port=443): Max retries exceeded")
        if call in self.denied:
            raise ApiDenied(self.context, self.namespace, 403, "Forbidden")

    def _of(self, kind: str, selector: str = "") -> list[Any]:
        wanted = kind if kind in CUSTOM_KINDS else _MODELS[kind]
        return [o for o in self.objects if _kind(o) == wanted and _matches(o, selector)]

    def _named(self, kind: str, name: str) -> Any | None:
        return next((o for o in self._of(kind) if _name(o) == name), None)

    def jobs(self, selector: str = "") -> list[Any]:
        self._guard("list Job")
        return self._of("Job", selector)

    def job(self, name: str) -> Any | None:
        self._guard("get Job")
        return self._named("Job", name)

    def pods(self, selector: str = "") -> list[Any]:
        self._guard("list Pod")
        return self._of("Pod", selector)

    def deployment(self, name: str) -> Any | None:
        self._guard("get Deployment")
        return self._named("Deployment", name)

    def config_maps(self, selector: str = "") -> list[Any]:
        self._guard("list ConfigMap")
        return self._of("ConfigMap", selector)

    def config_map(self, name: str) -> Any | None:
        self._guard("get ConfigMap")
        return self._named("ConfigMap", name)

    def exists(self, kind: str, name: str) -> bool:
        return self.get(kind, name) is not None

    def get(self, kind: str, name: str) -> Any | None:
        self._guard(f"get {kind}")
        return self._named(kind, name)

    def server_version(self) -> tuple[int, int, str]:
        self._guard("version")
        return self.version

    def nodes(self) -> list[Any]:
        self._guard("list Node")
        return self._of("Node")

    def daemon_sets(self, namespace: str) -> list[Any]:
        self._guard("list DaemonSet")
        return [d for d in self._of("DaemonSet") if d.metadata.namespace == namespace]

    def events(self, kind: str, name: str) -> list[Any]:
        self._guard("list Event")
        return [e for e in self._of("Event") if (e.involved_object.kind, e.involved_object.name) == (kind, name)]

    def create_pod(self, manifest: dict[str, Any]) -> None:
        self._guard("create Pod")
        assert self.probe is not None, "this test's cluster runs no pods"
        self.created.append(manifest)
        states, log = self.probe(manifest)
        name = manifest["metadata"]["name"]
        self._states[name] = [model(state) for state in states]
        self.logs[name] = log

    def delete_pod(self, name: str) -> None:
        self._guard("delete Pod")
        self.deleted.append(name)
        self._states.pop(name, None)

    def workloads(self, selector: str = "") -> list[dict[str, Any]]:
        return self._of("Workload", selector)

    def pod_log(self, name: str, container: str, *, follow: bool = False,
                tail_lines: int | None = None) -> Iterator[str]:
        lines = self.logs.get(name, [])
        yield from lines[-tail_lines:] if tail_lines else lines

    def exec(self, pod: str, container: str, argv: list[str]) -> str:
        if not self.trainer_log:
            raise Exit(f"exec in {pod}: no such file")
        return self.trainer_log
