"""`invoke ui webui|mlflow`: the original design's port-forwards to localhost:7860 (LLaMA Board) and :5000 (MLflow)."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from invoke.exceptions import Exit

from entrypoint.tracking import redact_uri
from k8s_tasks.cluster import Cluster, kubeconfig_problem
from k8s_tasks.mlflow_env import env_file, tracking_uri
from k8s_tasks.overlays import ENVS, NAMESPACE
from k8s_tasks.plan import Command, Plan
from k8s_tasks.status import WEBUI
from k8s_tasks.tools import REPO

TARGETS = {"webui": 7860, "mlflow": 5000}  # the local ports of the original design
WEBUI_PORT = 7860  # the Service's port (base/service-webui.yaml)
SCALE = f"kubectl scale deployment/{WEBUI} -n {NAMESPACE} --replicas"


def webui_problem(cluster: Cluster) -> str | None:
    """Why there is no LLaMA Board to forward to, and how to start it; None when it runs."""
    deployment = cluster.deployment(WEBUI)
    if deployment is None:
        return f"LLaMA Board is not deployed in namespace {NAMESPACE}: `invoke deploy --env=<env>` deploys it"
    if not deployment.spec.replicas:
        return ("LLaMA Board is not running: overlays/prod and overlays/multinode deploy it with 0 replicas, on a "
                "GPU pool of its own, so it never holds a training GPU. Start it with "
                f"`{SCALE}=1`, wait for `kubectl rollout status deployment/{WEBUI} -n {NAMESPACE}` (a node may "
                f"have to be added first), then run `invoke ui webui` again; `{SCALE}=0` stops it, and so does "
                "the next `invoke deploy`")
    return None


def in_cluster_service(uri: str) -> tuple[str, str, int] | None:
    """(namespace, service, port) when the URI names a Service by its cluster DNS name, else None."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    labels = host.split(".")
    if len(labels) >= 3 and labels[2] == "svc" and (len(labels) == 3 or ".".join(labels[3:]) == "cluster.local"):
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return labels[1], labels[0], port
    return None


def plan_ui(target: str, *, env: str | None = None, port: int | None = None, root: Path = REPO,
            cluster: Cluster | None = None) -> Plan:
    """The port-forward; for the WebUI, given the cluster, first that it runs (it may be scaled to 0)."""
    if target not in TARGETS:
        raise Exit(f"ui takes one of {', '.join(TARGETS)}, not {target!r}")
    local = port or TARGETS[target]
    checks = [kubeconfig_problem]
    if target == "webui":
        problem = webui_problem(cluster) if cluster is not None else None
        if problem:
            raise Exit(problem)
        argv = ("kubectl", "port-forward", "-n", NAMESPACE, f"svc/{WEBUI}", f"{local}:{WEBUI_PORT}")
        return Plan(f"LLaMA Board at http://localhost:{local} (Ctrl-C stops)", [Command(argv)], checks)
    if env is None:
        # The server is the one overlays/<env>/mlflow.env names: with one such file there is nothing to choose.
        present = [e for e in ENVS if (root / env_file(e)).is_file()]
        if len(present) != 1:
            raise Exit("ui mlflow needs --env: the server is the one in overlays/<env>/mlflow.env "
                       f"({'found for ' + ', '.join(present) if present else 'none exists yet'})")
        env = present[0]
    uri = tracking_uri(env, root)
    service = in_cluster_service(uri)
    if service is None:
        # Nothing to forward: the server is reachable as it is (or only through the user's own network).
        return Plan(f"MLflow runs outside the cluster: open {redact_uri(uri)}", [])
    namespace, name, remote = service
    argv = ("kubectl", "port-forward", "-n", namespace, f"svc/{name}", f"{local}:{remote}")
    return Plan(f"MLflow at http://localhost:{local} (Ctrl-C stops)", [Command(argv)], checks)
