"""Reading the cluster through the kubernetes Python client: structured objects for status, waiting and logs.

`Cluster` is the small surface the tasks use; `KubeCluster` implements it against the API server of the
current kubeconfig context (the same one kubectl uses). The tests use a fake of this surface: no API server
runs there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml
from invoke.exceptions import Exit

from k8s_tasks.overlays import NAMESPACE
from k8s_tasks.tools import REPO, find_tool, missing_tool_message

KUEUE_GROUP = "kueue.x-k8s.io"
# Newest first: Kueue serves v1beta2 since 0.15 and stops serving v1beta1 in 0.20; older releases (and GKE's
# documentation) have v1beta1 only.
KUEUE_VERSIONS = ("v1beta2", "v1beta1")
# How long one read may take: a cluster whose address does not answer fails within this, not after minutes.
REQUEST_TIMEOUT = 20
NO_CONTEXT = ("no Kubernetes context: connect kubectl to your cluster first "
              "(GKE: `gcloud container clusters get-credentials CLUSTER --region REGION --project $PROJECT_ID`)")


class ApiDenied(Exit):
    """The API server refused a request (401, 403): the message says who to ask for which access."""

    def __init__(self, context: str, namespace: str, status: int, reason: str) -> None:
        super().__init__(f"the cluster of kube context {context} refused access ({status} {reason}): log in again "
                         f"(`gcloud auth login`) or ask for access to namespace {namespace}")
        self.status, self.reason = status, reason


class ApiUnreachable(Exit):
    """The API server did not answer (no route, TLS, timeout)."""


class Cluster(Protocol):
    """The reads the tasks need (and the probe pod `invoke doctor` starts and deletes); objects are the kubernetes
    client's models (V1Job, V1Pod, ...). Calls raise ApiDenied or ApiUnreachable (both Exit) as the server answers."""

    namespace: str
    context: str

    def jobs(self, selector: str = "") -> list[Any]: ...
    def job(self, name: str) -> Any | None: ...
    def pods(self, selector: str = "") -> list[Any]: ...
    def deployment(self, name: str) -> Any | None: ...
    def config_maps(self, selector: str = "") -> list[Any]: ...
    def config_map(self, name: str) -> Any | None: ...
    def exists(self, kind: str, name: str) -> bool: ...
    def workloads(self, selector: str = "") -> list[dict[str, Any]]: ...
    def pod_log(self, name: str, container: str, *, follow: bool = False,
                tail_lines: int | None = None) -> Iterator[str]: ...
    def exec(self, pod: str, container: str, argv: list[str]) -> str: ...
    def server_version(self) -> tuple[int, int, str]: ...
    def nodes(self) -> list[Any]: ...
    def daemon_sets(self, namespace: str) -> list[Any]: ...
    def get(self, kind: str, name: str) -> Any | None: ...
    def events(self, kind: str, name: str) -> list[Any]: ...
    def create_pod(self, manifest: dict[str, Any]) -> None: ...
    def delete_pod(self, name: str) -> None: ...


def kubeconfig_files(environ: Mapping[str, str]) -> str:
    """The kubeconfig files kubectl reads: $KUBECONFIG (several, separated as PATH is), else ~/.kube/config."""
    return environ.get("KUBECONFIG") or str(Path(environ.get("HOME", str(Path.home()))) / ".kube" / "config")


def kubeconfig(environ: Mapping[str, str] | None = None) -> tuple[str | None, dict[str, Any]]:
    """(current context, its user entry) from the kubeconfig files as the kubernetes client merges them;
    (None, {}) when there is no current context. Nothing is contacted and no login plugin runs (that happens
    when the client connects)."""
    from kubernetes.config import ConfigException
    from kubernetes.config.kube_config import KubeConfigLoader, KubeConfigMerger

    files = kubeconfig_files(os.environ if environ is None else environ)
    try:
        merger = KubeConfigMerger(files)
        # kubectl takes the current context of the first file that sets one, the client's merger that of the
        # last: the tasks and the kubectl commands they run must talk to the same cluster.
        current = next((c for path in merger.paths if (c := merger.config_files[path].get("current-context"))),
                       None)
        if current is None:
            return None, {}
        context = KubeConfigLoader(merger.config, active_context=current).current_context
        user = merger.config["users"].get_with_name(context["context"].get("user"), safe=True)
    except (ConfigException, OSError, yaml.YAMLError) as exc:
        raise Exit(f"cannot load the kubeconfig ({files}): {exc}") from None
    return current, dict(user.value.get("user") or {}) if user is not None else {}


def kubeconfig_problem(root: Path = REPO, environ: Mapping[str, str] | None = None) -> str | None:
    """Why kubectl could not talk to a cluster, found without contacting it; None when it looks fine.

    A plan check: `root` (where the plan runs) does not matter here.
    """
    try:
        context, user = kubeconfig(environ)
    except Exit as exc:
        return exc.message
    if context is None:
        return NO_CONTEXT
    command = (user.get("exec") or {}).get("command")
    if command and "/" not in command and find_tool(command, environ) is None:
        return f"kube context {context} logs in with {missing_tool_message(command)}"
    return None


def current_context(environ: Mapping[str, str] | None = None) -> str:
    return kubeconfig(environ)[0] or "(none)"


class KubeCluster:
    """Cluster reads through the kubernetes client, in one namespace of the current kubeconfig context."""

    def __init__(self, namespace: str = NAMESPACE) -> None:
        from kubernetes import client, config

        problem = kubeconfig_problem()
        if problem:
            raise Exit(problem)
        self.context = current_context()
        try:
            api = config.new_client_from_config(config_file=kubeconfig_files(os.environ), context=self.context)
        except (config.ConfigException, OSError, TypeError, ValueError) as exc:
            raise Exit(f"cannot load the kubeconfig: {exc}") from None
        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return method(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status in (401, 403):
                raise ApiDenied(self.context, self.namespace, exc.status, exc.reason) from None
            raise Exit(f"the Kubernetes API answered {exc.status} {exc.reason}: {exc.body}") from None
        except HTTPError as exc:
            raise ApiUnreachable(f"cannot reach the cluster of kube context {self.context}: {exc}") from None

    def jobs(self, selector: str = "") -> list[Any]:
        return self._call(self.batch.list_namespaced_job, self.namespace, label_selector=selector).items

    def job(self, name: str) -> Any | None:
        return self._call(self.batch.read_namespaced_job, name, self.namespace)

    def pods(self, selector: str = "") -> list[Any]:
        return self._call(self.core.list_namespaced_pod, self.namespace, label_selector=selector).items

    def deployment(self, name: str) -> Any | None:
        return self._call(self.apps.read_namespaced_deployment, name, self.namespace)

    def config_maps(self, selector: str = "") -> list[Any]:
        return self._call(self.core.list_namespaced_config_map, self.namespace, label_selector=selector).items

    def config_map(self, name: str) -> Any | None:
        return self._call(self.core.read_namespaced_config_map, name, self.namespace)

    def exists(self, kind: str, name: str) -> bool:
        # Metadata only would do; the client has no such call, and none of these objects is large.
        return self.get(kind, name) is not None

    def get(self, kind: str, name: str) -> Any | None:
        """One object by kind and name (in the namespace, unless cluster-scoped); None when there is none."""
        cluster_scoped = {"Namespace": self.core.read_namespace,
                          "PersistentVolume": self.core.read_persistent_volume}
        namespaced = {
            "ConfigMap": self.core.read_namespaced_config_map,
            "Secret": self.core.read_namespaced_secret,
            "PersistentVolumeClaim": self.core.read_namespaced_persistent_volume_claim,
            "ServiceAccount": self.core.read_namespaced_service_account,
            "Service": self.core.read_namespaced_service,
            "LocalQueue": lambda name, namespace, **kwargs: self._kueue(
                self.custom.get_namespaced_custom_object, namespace, "localqueues", name, **kwargs),
            "Pod": self.core.read_namespaced_pod,
        }
        if kind in cluster_scoped:
            return self._call(cluster_scoped[kind], name, _request_timeout=REQUEST_TIMEOUT)
        return self._call(namespaced[kind], name, self.namespace, _request_timeout=REQUEST_TIMEOUT)

    def server_version(self) -> tuple[int, int, str]:
        """(major, minor, git version) of the API server; GKE reports minors such as "33+"."""
        from kubernetes import client

        info = self._call(client.VersionApi(self.core.api_client).get_code, _request_timeout=REQUEST_TIMEOUT)
        return int(info.major.rstrip("+")), int(info.minor.rstrip("+")), info.git_version

    def nodes(self) -> list[Any]:
        return self._call(self.core.list_node, _request_timeout=REQUEST_TIMEOUT).items

    def daemon_sets(self, namespace: str) -> list[Any]:
        return self._call(self.apps.list_namespaced_daemon_set, namespace, _request_timeout=REQUEST_TIMEOUT).items

    def events(self, kind: str, name: str) -> list[Any]:
        """The events about one object of the namespace, oldest first."""
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        found = self._call(self.core.list_namespaced_event, self.namespace, field_selector=selector,
                           _request_timeout=REQUEST_TIMEOUT).items
        return sorted(found, key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)

    def create_pod(self, manifest: dict[str, Any]) -> None:
        self._call(self.core.create_namespaced_pod, self.namespace, manifest, _request_timeout=REQUEST_TIMEOUT)

    def delete_pod(self, name: str) -> None:
        """Delete at once (no grace period); a pod already gone is fine."""
        self._call(self.core.delete_namespaced_pod, name, self.namespace, grace_period_seconds=0,
                   _request_timeout=REQUEST_TIMEOUT)

    def _kueue(self, method: Any, *args: Any, **kwargs: Any) -> Any | None:
        """A read of Kueue's objects at the newest version the cluster serves; None when no version answers (404:
        no Kueue, or no such object)."""
        for version in KUEUE_VERSIONS:
            found = self._call(method, KUEUE_GROUP, version, *args, **kwargs)
            if found is not None:
                return found
        return None

    def workloads(self, selector: str = "") -> list[dict[str, Any]]:
        """Kueue's Workloads (plain dicts); none where Kueue is not installed."""
        found = self._kueue(self.custom.list_namespaced_custom_object, self.namespace, "workloads",
                            label_selector=selector)
        return (found or {}).get("items", [])

    def pod_log(self, name: str, container: str, *, follow: bool = False,
                tail_lines: int | None = None) -> Iterator[str]:
        from kubernetes.watch.watch import iter_resp_lines

        kwargs: dict[str, Any] = {"container": container, "follow": follow, "_preload_content": False}
        if tail_lines is not None:
            kwargs["tail_lines"] = tail_lines
        response = self._call(self.core.read_namespaced_pod_log, name, self.namespace, **kwargs)
        if response is None:
            return
        try:
            yield from iter_resp_lines(response)
        finally:
            response.release_conn()

    def exec(self, pod: str, container: str, argv: list[str]) -> str:
        from kubernetes.stream import stream

        return self._call(stream, self.core.connect_get_namespaced_pod_exec, pod, self.namespace,
                          container=container, command=argv, stderr=True, stdin=False, stdout=True, tty=False)
