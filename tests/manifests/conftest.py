"""Fixtures of the rendered-manifest tests: one copy of the kustomize tree, each overlay rendered once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from k8s_tasks.overlays import copy_tree, parse, render_envs


@pytest.fixture(scope="session")
def manifest_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/, components/, overlays/ copied, each overlay with an mlflow.env made from its example."""
    return copy_tree(tmp_path_factory.mktemp("kustomize"))


@pytest.fixture(scope="session")
def renders(manifest_tree: Path) -> dict[str, str]:
    return render_envs(manifest_tree)


@pytest.fixture(scope="session")
def docs(renders: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {overlay: parse(text) for overlay, text in renders.items()}
