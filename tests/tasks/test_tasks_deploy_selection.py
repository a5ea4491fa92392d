"""What `deploy --component` applies, as the real kubectl selects it from the real render: the original design's
all/base/webui split, never the Jobs.

kubectl needs an API server's discovery to map kinds even for a client-side dry run; a FAKE discovery
endpoint on 127.0.0.1 answers that (and nothing else: `create --dry-run=client` sends no object).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from k8s_fake_cluster import FakeCluster
from k8s_task_objects import DEPLOYED, deployed, local_queue

from k8s_tasks.deploy import plan_deploy
from k8s_tasks.jobs import TEMPLATE_ANNOTATION, plan_start
from k8s_tasks.overlays import COMBINATIONS, ENVS, with_components
from k8s_tasks.plan import WriteFile
from k8s_tasks.tools import require_tool


def _resources(group_version: str, *kinds: tuple[str, str, bool]) -> dict:
    return {"kind": "APIResourceList", "groupVersion": group_version, "resources": [
        {"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": ["create", "get"]}
        for name, kind, namespaced in kinds]}


DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
         "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}}
        for g in ("apps", "batch", "networking.k8s.io")]},
    "/api/v1": _resources("v1", ("namespaces", "Namespace", False), ("serviceaccounts", "ServiceAccount", True),
                          ("configmaps", "ConfigMap", True), ("secrets", "Secret", True),
                          ("services", "Service", True), ("persistentvolumes", "PersistentVolume", False),
                          ("persistentvolumeclaims", "PersistentVolumeClaim", True)),
    "/apis/apps/v1": _resources("apps/v1", ("deployments", "Deployment", True)),
    "/apis/batch/v1": _resources("batch/v1", ("jobs", "Job", True)),
    "/apis/networking.k8s.io/v1": _resources("networking.k8s.io/v1", ("networkpolicies", "NetworkPolicy", True)),
}


class _Discovery(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        doc = DISCOVERY.get(self.path.split("?")[0])
        if doc is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(doc).encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def kube_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    server = HTTPServer(("127.0.0.1", 0), _Discovery)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path_factory.mktemp("kube-home")
    kubeconfig = home / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "fake", "user": {}}],
    }))
    yield {**os.environ, "HOME": str(home), "KUBECONFIG": str(kubeconfig)}
    server.shutdown()


def selected(tree: Path, env: str, component: str | None, kube_env: dict[str, str], environ: dict[str, str],
             ) -> list[str]:
    """kind/name of what deploy's `kubectl apply` would send: its own -k and -l, as a client dry run; with
    component None, everything the render holds (the same -k without -l)."""
    plan = plan_deploy(env, component or "all", DEPLOYED[env], root=tree, environ=environ)
    for step in plan.steps:
        if isinstance(step, WriteFile):
            (tree / step.path).parent.mkdir(parents=True, exist_ok=True)
            (tree / step.path).write_text(step.content)
    apply = plan.commands()[0]
    assert apply[:2] == ["kubectl", "apply"] and apply[4] == "-l"
    arguments = apply[2:] if component else apply[2:4]
    result = subprocess.run([require_tool("kubectl"), "create", "--dry-run=client", "-o", "name", "--validate=false",
                             *arguments], cwd=tree, env=kube_env, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    return sorted(result.stdout.split())


@pytest.mark.parametrize("env", ENVS)
def test_components_split_the_overlay_and_never_apply_jobs(env: str, tree: Path, kube_env: dict[str, str],
                                                           environ: dict[str, str]) -> None:
    everything = selected(tree, env, "all", kube_env, environ)
    base = selected(tree, env, "base", kube_env, environ)
    webui = selected(tree, env, "webui", kube_env, environ)
    assert webui == ["deployment.apps/llama-webui", "service/llama-webui"]
    assert sorted(base + webui) == everything
    assert not any(name.startswith("job.batch/") for name in everything)
    kinds = {name.split("/")[0] for name in base}
    # The multi-node overlay's headless Service (node 0's DNS name) is infrastructure the Jobs need: base.
    assert kinds == {"namespace", "serviceaccount", "configmap", "secret", "persistentvolume",
                     "persistentvolumeclaim", "networkpolicy.networking.k8s.io",
                     *(["service"] if env == "multinode" else [])}
    # The identity ConfigMaps the Jobs of `invoke train` and `invoke merge` read are part of base.
    assert sum(name.startswith(("configmap/llama-train-", "configmap/llama-merge-")) for name in base) == 2


@pytest.mark.parametrize("env", ENVS)
def test_deploy_and_the_jobs_of_train_and_merge_are_the_whole_render(env: str, tree: Path, kube_env: dict[str, str],
                                                                      environ: dict[str, str], started: dict) -> None:
    """Nothing falls between the selectors: what `deploy --component all` applies plus the Jobs that `train` and
    `merge` copy from the render are exactly the rendered objects (the multi-node Service and policy included)."""
    everything = selected(tree, env, None, kube_env, environ)
    deployed = selected(tree, env, "all", kube_env, environ)
    jobs = []
    for component in ("train", "merge"):
        plan, _, _ = started[env, component]
        created = yaml.safe_load(plan.steps[0].stdin)
        jobs.append(f"job.batch/{created['metadata']['annotations'][TEMPLATE_ANNOTATION]}")
    assert sorted(deployed + jobs) == everything
    assert len(set(everything)) == len(everything)
    if env == "multinode":
        assert {"service/llama-train-nodes", "networkpolicy.networking.k8s.io/allow-train-nodes"} <= set(deployed)


@pytest.mark.parametrize("env", ["gpu", "multinode"])
@pytest.mark.parametrize("components", COMBINATIONS, ids="+".join)
def test_with_the_components_for_cheaper_gpus_nothing_falls_between_the_selectors(
        env: str, components: tuple[str, ...], tree: Path, kube_env: dict[str, str], environ: dict[str, str]) -> None:
    """components/spot, kueue and flex-start add no object and keep the Jobs' component labels: deploy still
    applies everything but the Jobs, and the Jobs `train` and `merge` create are the rest (multinode: with its
    Service and policy)."""
    kustomization = tree / "overlays" / env / "kustomization.yaml"
    kustomization.write_text(with_components(kustomization.read_text(), components))
    everything = selected(tree, env, None, kube_env, environ)
    applied = selected(tree, env, "all", kube_env, environ)
    cluster = FakeCluster([*deployed(env, tree), local_queue("llama-factory")])
    jobs = []
    for component in ("train", "merge"):
        plan, _ = plan_start(env, component, cluster, now=datetime(2026, 1, 2, tzinfo=UTC), root=tree)
        created = yaml.safe_load(plan.steps[0].stdin)
        jobs.append(f"job.batch/{created['metadata']['annotations'][TEMPLATE_ANNOTATION]}")
    assert sorted(applied + jobs) == everything
    assert not any(name.startswith("job.batch/") for name in applied)
