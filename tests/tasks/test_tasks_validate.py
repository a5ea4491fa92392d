"""`invoke validate` stops on what CI would reject, and says where; a placeholder image never reaches a cluster."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import yaml
from invoke.exceptions import Exit
from k8s_task_objects import DEPLOYED

from k8s_tasks.deploy import plan_deploy
from k8s_tasks.image import PLACEHOLDER, ImageRef
from k8s_tasks.overlays import ENVS, images_of, render_overlay
from k8s_tasks.validate import unpullable_images, validate


def test_an_overlay_that_does_not_render_is_named(tree: Path) -> None:
    (tree / "overlays/gpu/patches/persistentvolume.nfs-server.yaml").unlink()
    with pytest.raises(Exit) as raised:
        validate(io.StringIO(), tree)
    assert "overlays/gpu` failed" in raised.value.message
    assert "persistentvolume.nfs-server.yaml" in raised.value.message


def test_an_invalid_field_fails_strict_validation(tree: Path) -> None:
    patch = tree / "overlays/dev/patches/job-train.deadlines.yaml"
    patch.write_text(patch.read_text().replace("spec:\n", "spec:\n  backofLimit: 2\n", 1))
    out = io.StringIO()
    with pytest.raises(Exit) as raised:
        validate(out, tree)
    assert "kubernetes-validate --strict against Kubernetes 1.31 failed" in raised.value.message
    assert "backofLimit" in raised.value.message
    assert "- render overlays/prod" in out.getvalue()  # every overlay was rendered first


def _set_image_as_kustomize_edit_does(tree: Path, env: str, image: str) -> None:
    """What `kustomize edit set image PLACEHOLDER=<image>` writes into the overlay (no standalone kustomize
    here): newName and newTag (or digest) on the `images:` entry named after the placeholder."""
    path = tree / "overlays" / env / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    (entry,) = kustomization["images"]
    ref = ImageRef.parse(image)
    entry.pop("newTag", None)
    entry.pop("digest", None)
    entry.update({"newName": ref.repository, **({"digest": ref.digest} if ref.digest else {"newTag": ref.tag})})
    path.write_text(yaml.safe_dump(kustomization, sort_keys=False))


@pytest.mark.parametrize("env", ENVS)
def test_plain_kubectl_apply_of_a_shipped_overlay_is_refused(env: str, tree: Path) -> None:
    """The overlays ship a placeholder image: `invoke validate --env` fails before anything else runs, and says
    how to set the image."""
    out = io.StringIO()
    with pytest.raises(Exit) as raised:
        validate(out, tree, env=env)
    message = raised.value.message
    assert f"`kubectl apply -k overlays/{env}` would start pods that can never pull their image" in message
    assert f"{PLACEHOLDER}" in message and "is the placeholder" in message
    assert f"(cd overlays/{env} && kustomize edit set image {PLACEHOLDER}=" in message
    assert "kubernetes-validate" not in out.getvalue()


def test_an_overlay_with_its_image_set_passes_for_plain_kubectl(tree: Path) -> None:
    image = f"{DEPLOYED['gpu'].repository}:0123456789ab"
    _set_image_as_kustomize_edit_does(tree, "gpu", image)
    docs = render_overlay("gpu", root=tree)
    assert images_of(docs) == {image}
    assert unpullable_images(docs) == []
    shutil.copytree(Path(__file__).resolve().parents[2] / "docker", tree / "docker")
    out = io.StringIO()
    validate(out, tree, env="gpu")  # the whole check: kubernetes-validate and checkov included
    assert out.getvalue().splitlines()[-1] == (
        "validate: overlays/gpu renders with pullable images, is valid Kubernetes, and passes checkov")


def test_deploy_refuses_an_overlay_whose_image_entry_was_renamed(tree: Path, environ: dict[str, str]) -> None:
    """After `kustomize edit set image`, deploy's own `images:` entry no longer matches: it would apply the
    overlay's image instead of the built one. Its plan stops and says how to undo the edit."""
    plan = plan_deploy("gpu", "all", DEPLOYED["gpu"], root=tree, environ=environ)
    assert plan.problems(tree, environ, tools_root=tree) == []
    _set_image_as_kustomize_edit_does(tree, "gpu", f"{DEPLOYED['gpu'].repository}:aaaaaaaaaaaa")
    (problem,) = plan.problems(tree, environ, tools_root=tree)
    other = f"{DEPLOYED['gpu'].repository}:aaaaaaaaaaaa"
    assert f"overlays/gpu would still run {other} besides {DEPLOYED['gpu']}" in problem
    assert "`git checkout overlays/gpu/kustomization.yaml`" in problem
