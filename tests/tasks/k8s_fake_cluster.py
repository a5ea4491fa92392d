"""A FAKE of the Kubernetes API for the task tests: no API server runs here.

It holds the kubernetes client's own model objects (V1Job, V1Pod, ...), built from plain manifests by the
client's deserializer, so the code under test reads the same attributes it reads from a real cluster; Kueue's
objects (LocalQueue, Workload) stay plain dicts, as the client's custom-objects API returns them. It answers
only the reads of k8s_tasks.cluster.Cluster; label selectors are equality-only (all the tasks use).
A timeline of snapshots lets a test move the cluster forward each time the code under test sleeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from invoke.exceptions import Exit
from kubernetes.client import ApiClient

_API = ApiClient()
_MODELS = {"Job": "V1Job", "Pod": "V1Pod", "Deployment": "V1Deployment", "ConfigMap": "V1ConfigMap",
           "Secret": "V1Secret", "PersistentVolumeClaim": "V1PersistentVolumeClaim",
           "ServiceAccount": "V1ServiceAccount", "Service": "V1Service"}
CUSTOM_KINDS = ("LocalQueue", "Workload")


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
                 trainer_log: str = "", namespace: str = "llm-training", context: str = "fake-context") -> None:
        self.namespace = namespace
        self.context = context
        self.timeline = [[model(m) for m in snapshot] for snapshot in snapshots] or [[]]
        self.logs = logs or {}
        self.trainer_log = trainer_log

    @property
    def objects(self) -> list[Any]:
        return self.timeline[0]

    def advance(self, _seconds: float = 0) -> None:
        """Move to the next snapshot (used as the `sleep` of the code under test); stay on the last one."""
        if len(self.timeline) > 1:
            self.timeline.pop(0)

    def _of(self, kind: str, selector: str = "") -> list[Any]:
        wanted = kind if kind in CUSTOM_KINDS else _MODELS[kind]
        return [o for o in self.objects if _kind(o) == wanted and _matches(o, selector)]

    def _named(self, kind: str, name: str) -> Any | None:
        return next((o for o in self._of(kind) if _name(o) == name), None)

    def jobs(self, selector: str = "") -> list[Any]:
        return self._of("Job", selector)

    def job(self, name: str) -> Any | None:
        return self._named("Job", name)

    def pods(self, selector: str = "") -> list[Any]:
        return self._of("Pod", selector)

    def deployment(self, name: str) -> Any | None:
        return self._named("Deployment", name)

    def config_maps(self, selector: str = "") -> list[Any]:
        return self._of("ConfigMap", selector)

    def config_map(self, name: str) -> Any | None:
        return self._named("ConfigMap", name)

    def exists(self, kind: str, name: str) -> bool:
        return self._named(kind, name) is not None

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
