"""House style of the kustomize tree, checked on every kustomization.yaml."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from k8s_tasks.overlays import ENVS, KUSTOMIZE_DIRS
from k8s_tasks.tools import REPO

KUSTOMIZATIONS = sorted(p for d in KUSTOMIZE_DIRS for p in (REPO / d).rglob("kustomization.yaml"))
CURRENT_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "configMapGenerator",
    "secretGenerator",
    "patches",
    "labels",
    "replacements",
    "images",
    "configurations",
}
# The untracked secret file a secretGenerator reads (absent in a fresh clone), and its committed example.
SECRET_FILES = {"mlflow.env.example", "mlflow.env"}
IMAGE = "REGION-docker.pkg.dev/PROJECT/REPOSITORY/llama-factory-train"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _listed_files(directory: Path, kustomization: dict) -> set[Path]:
    files = {directory / "kustomization.yaml"}
    files |= {directory / r for r in kustomization.get("resources", []) if (directory / r).is_file()}
    files |= {directory / p["path"] for p in kustomization.get("patches", []) if "path" in p}
    files |= {directory / c for c in kustomization.get("configurations", [])}
    for generator in kustomization.get("configMapGenerator", []) + kustomization.get("secretGenerator", []):
        files |= {directory / f for f in generator.get("envs", []) + generator.get("files", [])}
    return files


def test_every_kustomization_is_found() -> None:
    names = {str(p.parent.relative_to(REPO)) for p in KUSTOMIZATIONS}
    assert {"base", "components/gpu", "components/job-identity", "components/filestore",
            "components/multinode"} <= names
    assert {f"overlays/{o}" for o in ENVS} <= names


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.parent.relative_to(REPO)))
def test_kustomization_uses_only_current_fields(path: Path) -> None:
    kustomization = _load(path)
    assert set(kustomization) <= CURRENT_FIELDS, (
        f"deprecated or unknown: {set(kustomization) - CURRENT_FIELDS}"
    )
    in_components = path.parent.parent.name == "components"
    if in_components:
        assert (kustomization["apiVersion"], kustomization["kind"]) == (
            "kustomize.config.k8s.io/v1alpha1",
            "Component",
        )
        assert "namespace" not in kustomization
    else:
        assert (kustomization["apiVersion"], kustomization["kind"]) == (
            "kustomize.config.k8s.io/v1beta1",
            "Kustomization",
        )
        # The storage owner runs as root: in a namespace of its own, never in llm-training ("restricted").
        in_admin = path.parent.parent.name == "admin"
        assert kustomization["namespace"] == ("llm-storage-admin" if in_admin else "llm-training")
    for label in kustomization.get("labels", []):
        assert label.get("includeSelectors") is False, "labels that may change stay out of selectors"
    for patch in kustomization.get("patches", []):
        assert set(patch) <= {"path", "target"}, "patches live in files under patches/"
        assert re.fullmatch(r"patches/[a-z-]+\.[a-z0-9-]+\.yaml", patch["path"]), patch["path"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.parent.relative_to(REPO)))
def test_one_object_per_file_and_every_file_listed(path: Path) -> None:
    directory = path.parent
    kustomization = _load(path)
    listed = {f for f in _listed_files(directory, kustomization) if f.name not in SECRET_FILES}
    for file in listed:
        assert file.is_file(), f"{file.relative_to(REPO)} is listed but missing"
    present = {p for p in directory.rglob("*") if p.is_file() and p.name not in SECRET_FILES}
    nested = {p for p in present for k in KUSTOMIZATIONS if k.parent != directory and k.parent in p.parents}
    assert present - nested == listed, "files in the directory that the kustomization does not list"
    for file in listed - {path}:
        if file.suffix == ".yaml":
            documents = [d for d in yaml.safe_load_all(file.read_text()) if d is not None]
            assert len(documents) == 1, f"{file.relative_to(REPO)}: one object per file"


def test_image_is_set_only_by_each_overlays_images_entry() -> None:
    for path in KUSTOMIZATIONS:
        kustomization = _load(path)
        overlay = path.parent.parent.name == "overlays"
        images = kustomization.get("images", [])
        if overlay:
            assert [i["name"] for i in images] == [IMAGE], path
            assert images[0].get("newTag") != "latest"
        else:
            assert not images, f"{path}: only overlays set the image"
    for patch in (REPO / "overlays").rglob("patches/*.yaml"):
        assert "image:" not in patch.read_text(), f"{patch}: images are set through `images:` only"


@pytest.mark.parametrize("overlay", ENVS)
def test_secret_env_file_is_untracked_and_has_an_example(overlay: str) -> None:
    directory = REPO / "overlays" / overlay
    generators = _load(directory / "kustomization.yaml")["secretGenerator"]
    assert [(g["name"], g["envs"]) for g in generators] == [("mlflow-config", ["mlflow.env"])]
    assert (directory / "mlflow.env.example").is_file()
    ignored = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "-q", f"overlays/{overlay}/mlflow.env"], check=False
    )
    assert ignored.returncode == 0, "mlflow.env must be ignored by git: it holds credentials"
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--error-unmatch", f"overlays/{overlay}/mlflow.env"],
        capture_output=True,
        check=False,
    )
    assert tracked.returncode != 0, "mlflow.env is committed"
