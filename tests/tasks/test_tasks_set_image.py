"""deploy sets the image in one generated kustomization around the overlay; real kustomize renders it exactly
as if the overlay's own `images:` said so (Job identity hashes included), and no placeholder survives."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from k8s_task_objects import DEPLOYED

from k8s_tasks.image import PLACEHOLDER, ImageRef
from k8s_tasks.overlays import ENVS, find, parse, render, render_overlay
from k8s_tasks.tools import require_tool


def _edit_overlay_images(tree: Path, env: str) -> None:
    """What `kustomize edit set image` in the overlay itself would do."""
    path = tree / "overlays" / env / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    image = DEPLOYED[env]
    entry = {"name": PLACEHOLDER, "newName": image.repository}
    entry.update({"digest": image.digest} if image.digest else {"newTag": image.tag})
    kustomization["images"] = [entry]
    path.write_text(yaml.safe_dump(kustomization))


@pytest.mark.parametrize("env", ENVS)
def test_the_wrapper_renders_like_an_edited_overlay(env: str, tree: Path) -> None:
    wrapped = render_overlay(env, DEPLOYED[env], tree)
    _edit_overlay_images(tree, env)
    edited = parse(render(tree / "overlays" / env, require_tool("kubectl")))
    assert wrapped == edited


@pytest.mark.parametrize("env", ENVS)
def test_every_workload_and_identity_gets_the_deployed_image(env: str, tree: Path) -> None:
    docs = render_overlay(env, DEPLOYED[env], tree)
    workloads = find(docs, "Job") + find(docs, "Deployment")
    images = {c["image"] for d in workloads for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {str(DEPLOYED[env])}
    identities = [d for d in find(docs, "ConfigMap") if "IMAGE" in d.get("data", {})]
    assert {d["data"]["IMAGE"] for d in identities} == {str(DEPLOYED[env])}
    assert PLACEHOLDER not in yaml.safe_dump_all(docs)


@pytest.mark.parametrize("env", ENVS)
def test_another_image_gives_other_job_names(env: str, tree: Path) -> None:
    # docs/adr/009: the Jobs' names carry the hash of their whole spec (the image included) and configuration.
    first = {d["metadata"]["name"] for d in find(render_overlay(env, DEPLOYED[env], tree), "Job")}
    other = ImageRef(DEPLOYED[env].repository, tag="ffffffffffff")
    second = {d["metadata"]["name"] for d in find(render_overlay(env, other, tree), "Job")}
    assert first.isdisjoint(second)
