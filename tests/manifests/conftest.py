"""Fixtures of the rendered-manifest tests: one copy of the kustomize tree, each overlay rendered once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from k8s_tasks.overlays import add_combinations, copy_tree, parse, render, render_envs
from k8s_tasks.tools import require_tool


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


@pytest.fixture(scope="session")
def combination_renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every overlay with each combination of the components for cheaper GPUs (overlays.COMBINATIONS), added as a
    user adds them: one line each. Keyed <env>+<component>..."""
    tree = copy_tree(tmp_path_factory.mktemp("combinations"))
    kubectl = require_tool("kubectl")
    return {name: render(tree / "overlays" / name, kubectl) for name in add_combinations(tree)}


@pytest.fixture(scope="session")
def combination_docs(combination_renders: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {name: parse(text) for name, text in combination_renders.items()}
