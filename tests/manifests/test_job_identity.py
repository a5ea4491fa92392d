"""Jobs are immutable: their names carry the hash of what they run (docs/adr/004-job-naming-and-reapply.md).

Re-applying an unchanged overlay sends the very same Jobs (a no-op); a changed config value or image
produces new Job names, so `kubectl apply` creates new Jobs instead of failing on an immutable pod template
or silently keeping the old configuration.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from kustomize_helpers import env_of

from k8s_tasks.overlays import ENVS, find, one, parse, render


def _jobs(docs: list[dict]) -> dict[str, dict]:
    return {c: one(docs, "Job", c) for c in ("train", "merge")}


def _llm_config(docs: list[dict]) -> dict:
    return next(d for d in docs if d["metadata"]["name"].startswith("llm-config-"))


@pytest.mark.parametrize("overlay", ENVS)
def test_job_names_carry_the_hash_of_config_and_image(overlay: str, docs: dict) -> None:
    jobs = _jobs(docs[overlay])
    match = re.fullmatch(r"llama-train-([a-z0-9]{10})", jobs["train"]["metadata"]["name"])
    assert match, jobs["train"]["metadata"]["name"]
    assert jobs["merge"]["metadata"]["name"] == f"llama-merge-{match.group(1)}"
    config = _llm_config(docs[overlay])["data"]
    for component, job in jobs.items():
        name = job["metadata"]["name"]
        (container,) = job["spec"]["template"]["spec"]["containers"]
        identity = next(d for d in find(docs[overlay], "ConfigMap") if d["metadata"]["name"] == name)
        assert identity["data"] == {**config, "IMAGE": container["image"]}, component
        # The pod learns its image from the same ConfigMap.
        assert env_of(container)["IMAGE"] == {"configMapKeyRef": {"name": name, "key": "IMAGE"}}


def test_each_overlay_has_its_own_job_names(docs: dict) -> None:
    names = {_jobs(docs[o])["train"]["metadata"]["name"] for o in ENVS}
    assert len(names) == len(ENVS)


def _render_variant(tree: Path, tmp_path: Path, edit: Callable[[Path], None]) -> list[dict]:
    variant = tmp_path / "variant"
    shutil.copytree(tree, variant, ignore=shutil.ignore_patterns("render-*.yaml", "filestore-example"))
    edit(variant)
    return parse(render(variant / "overlays" / "gpu"))


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


CHANGES = {
    "base default": lambda t: _replace(t / "base" / "llm-config.env", "\nLORA_RANK=8\n", "\nLORA_RANK=16\n"),
    "overlay value": lambda t: _replace(
        t / "overlays" / "gpu" / "kustomization.yaml",
        "ADAPTER_WAIT_SECONDS=86400",
        "ADAPTER_WAIT_SECONDS=90000",
    ),
    "image": lambda t: _replace(
        t / "overlays" / "gpu" / "kustomization.yaml", 'newTag: "0.1.0"', 'newTag: "0.1.1"'
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_gives_new_job_names(change: str, manifest_tree: Path, tmp_path: Path, docs: dict) -> None:
    before = _jobs(docs["gpu"])
    after_docs = _render_variant(manifest_tree, tmp_path, CHANGES[change])
    after = _jobs(after_docs)
    for component in ("train", "merge"):
        assert after[component]["metadata"]["name"] != before[component]["metadata"]["name"], component
    webui = one(after_docs, "Deployment", "webui")["spec"]["template"]["spec"]["containers"][0]
    if change != "image":
        # The WebUI rolls to the new configuration too.
        assert webui["envFrom"][0]["configMapRef"]["name"] == _llm_config(after_docs)["metadata"]["name"]
        assert _llm_config(after_docs)["metadata"]["name"] != _llm_config(docs["gpu"])["metadata"]["name"]


def test_new_credentials_leave_the_jobs_unchanged(manifest_tree: Path, tmp_path: Path, docs: dict) -> None:
    """The Secret keeps one name: rotating credentials re-applies the Jobs as they are (no new training)."""
    after_docs = _render_variant(
        manifest_tree,
        tmp_path,
        lambda t: _replace(
            t / "overlays" / "gpu" / "mlflow.env", "MLFLOW_TRACKING_TOKEN=", "MLFLOW_TRACKING_TOKEN=x"
        ),
    )
    assert one(after_docs, "Secret") != one(docs["gpu"], "Secret")
    assert _jobs(after_docs) == _jobs(docs["gpu"])
