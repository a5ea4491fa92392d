"""Fixtures of the task tests: a copy of the kustomize tree to plan against, a kubeconfig, an environment."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from k8s_fake_cluster import FakeCluster
from k8s_task_objects import deployed

from k8s_tasks.jobs import plan_start
from k8s_tasks.overlays import ENVS, copy_tree
from k8s_tasks.plan import Plan

REPO = Path(__file__).resolve().parents[2]
PROJECT = "my-project"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)  # when the tests' Jobs are started


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A repository root with base/, components/, overlays/ (mlflow.env from the examples), benchmarks/."""
    root = copy_tree(tmp_path / "repo", REPO)
    (root / "benchmarks").mkdir()
    return root


@pytest.fixture(scope="session")
def started(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Plan, str, FakeCluster]]:
    """(plan, Job name, cluster) of `invoke train` and `invoke merge` for every overlay, after a deploy."""
    root = copy_tree(tmp_path_factory.mktemp("started") / "repo", REPO)
    found = {}
    for env in ENVS:
        cluster = FakeCluster(deployed(env, root))
        for component in ("train", "merge"):
            plan, name = plan_start(env, component, cluster, now=NOW, root=root)
            found[env, component] = plan, name, cluster
    return found


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """PROJECT_ID, REGION and REPOSITORY set, a kubeconfig with a current context, docker credentials for the
    registry."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gke_my-project_europe-west4_training",
        "contexts": [{"name": "gke_my-project_europe-west4_training",
                      "context": {"cluster": "training", "user": "me"}}],
        "clusters": [{"name": "training", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "me", "user": {"token": "not-a-real-token"}}],
    }))
    docker = tmp_path / "docker-config"
    docker.mkdir()
    (docker / "config.json").write_text('{"auths": {"europe-west4-docker.pkg.dev": {}}}')
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PROJECT_ID": PROJECT,
            "REGION": "europe-west4", "REPOSITORY": "training",
            "KUBECONFIG": str(kubeconfig), "DOCKER_CONFIG": str(docker)}


@pytest.fixture
def path_without(tmp_path: Path) -> Callable[..., str]:
    """A PATH on which the named tools are missing and the others the tasks call are found."""

    def make(*hidden: str) -> str:
        folder = tmp_path / f"path-without-{'-'.join(hidden)}"
        folder.mkdir(exist_ok=True)
        for name in ("git", "kubectl", "docker", "gcloud"):
            found = shutil.which(name)
            if found and name not in hidden and not (folder / name).exists():
                (folder / name).symlink_to(found)
        return str(folder)

    return make
