"""Fixtures of the task tests: a copy of the kustomize tree to plan against, a kubeconfig, an environment."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from k8s_tasks.overlays import copy_tree

REPO = Path(__file__).resolve().parents[2]
PROJECT = "my-project"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A repository root with base/, components/, overlays/ (mlflow.env from the examples) and docker/."""
    root = copy_tree(tmp_path / "repo", REPO)
    (root / "benchmarks").mkdir()
    return root


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """PROJECT_ID set, a kubeconfig with a current context, docker credentials for eu.gcr.io."""
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
    (docker / "config.json").write_text('{"auths": {"eu.gcr.io": {}}}')
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PROJECT_ID": PROJECT,
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
