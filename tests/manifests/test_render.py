"""Every overlay renders with the real kustomize, matches its reviewed render, and is valid Kubernetes."""

from __future__ import annotations

import base64
import difflib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s_tasks.generate import COMMAND, EXPECTED_DIR
from k8s_tasks.overlays import ENVS, one, render
from k8s_tasks.tools import REPO
from k8s_tasks.validate import K8S_MINORS

KUBERNETES_VALIDATE = [sys.executable, "-m", "kubernetes_validate"]


@pytest.mark.parametrize("overlay", ENVS)
def test_render_matches_reviewed_expected_render(overlay: str, renders: dict[str, str]) -> None:
    expected = REPO / EXPECTED_DIR / f"{overlay}.yaml"
    assert expected.is_file(), f"{expected} missing: run `{COMMAND}` and review it"
    diff = "".join(
        difflib.unified_diff(
            expected.read_text().splitlines(keepends=True),
            renders[overlay].splitlines(keepends=True),
            f"expected/{overlay}.yaml",
            f"kubectl kustomize overlays/{overlay}",
        )
    )
    assert not diff, (
        f"the render changed; if intended, run `{COMMAND}` and review the diff "
        f"of {expected.relative_to(REPO)}:\n{diff}"
    )


@pytest.mark.parametrize("overlay", ENVS)
def test_rendering_twice_gives_the_same_objects(
    overlay: str, manifest_tree: Path, renders: dict[str, str]
) -> None:
    # What `kubectl apply -k` sends twice must be identical for the second apply to change nothing.
    assert render(manifest_tree / "overlays" / overlay) == renders[overlay]


@pytest.mark.parametrize("overlay", ENVS)
def test_secret_comes_from_the_example_file_only(overlay: str, docs: dict) -> None:
    # Renders (and so the committed expected renders) are made from mlflow.env.example: no real value.
    secret = one(docs[overlay], "Secret")
    assert secret["metadata"]["name"] == "mlflow-config"
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    example = REPO / "overlays" / overlay / "mlflow.env.example"
    keys = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in example.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert data == keys
    assert set(keys) == {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
    }
    assert data["MLFLOW_TRACKING_URI"], "the example must show a tracking URI"


@pytest.mark.parametrize("minor", K8S_MINORS)
def test_renders_are_valid_kubernetes(minor: str, manifest_tree: Path, renders: dict[str, str]) -> None:
    files = []
    for overlay, text in renders.items():
        path = manifest_tree / f"render-{overlay}.yaml"
        path.write_text(text)
        files.append(str(path))
    result = subprocess.run(
        [*KUBERNETES_VALIDATE, "--strict", "--quiet", "-k", minor, *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubernetes-validate --strict -k {minor}:\n{result.stdout}{result.stderr}"


def test_strict_validation_rejects_unknown_fields(tmp_path: Path, docs: dict) -> None:
    """The validator really checks: a misspelt field in a Job fails --strict (guards the test above)."""
    job = one(docs["gpu"], "Job", "train")
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    result = subprocess.run(
        [*KUBERNETES_VALIDATE, "--strict", "--quiet", "-k", K8S_MINORS[0], str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "restartPolicyy" in result.stdout + result.stderr
