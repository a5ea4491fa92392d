"""`invoke deploy`: apply an overlay (all, base or webui) with the built image, never the Jobs.

The image is chosen here and set in one generated file (overlays.wrapper_step). prod takes only a
committed build, pinned by the digest its registry reports.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from invoke.exceptions import Exit

from k8s_tasks.cluster import current_context, kubeconfig_problem
from k8s_tasks.image import (
    PLACEHOLDER,
    ImageRef,
    git_state,
    placeholder_problem,
    repository,
    resolve_digest,
    validate_digest,
    validate_tag,
)
from k8s_tasks.mlflow_env import mlflow_env_steps
from k8s_tasks.overlays import NAMESPACE, SELECTORS, deploy_dir, images_of, render_overlay, wrapper_step
from k8s_tasks.plan import Command, Plan
from k8s_tasks.status import WEBUI
from k8s_tasks.tools import REPO

COMPONENTS = {
    "all": "everything but the Jobs",
    "base": "namespace, Secret, storage, configuration, network policies",
    "webui": "the WebUI Deployment and Service",
}
# The WebUI's startup probe allows 5 minutes; a GPU node may have to be added first.
ROLLOUT_TIMEOUT = "15m"


def deploy_image(env: str, *, tag: str | None = None, digest: str | None = None, root: Path = REPO,
                 environ: Mapping[str, str] | None = None) -> ImageRef:
    """The image deploy sets: the registry from PROJECT_ID, the tag from git (or --tag), for prod a digest."""
    repo = repository(environ)
    if digest is not None:
        return ImageRef(repo, tag=validate_tag(tag) if tag else None, digest=validate_digest(digest))
    tag = validate_tag(tag) if tag else git_state(root, environ).tag
    if env != "prod":
        return ImageRef(repo, tag)
    if tag.endswith("-dirty"):
        raise Exit(f"prod deploys only committed builds, and {tag} has uncommitted changes: commit, "
                   "`invoke build push`, then deploy again")
    ref = ImageRef(repo, tag)
    return ImageRef(repo, tag, resolve_digest(ref, environ))


def image_problem(env: str, image: ImageRef, root: Path = REPO, environ: Mapping[str, str] | None = None) -> str | None:
    """Why what deploy applies would run other images than `image` (a plan check: it renders the overlay)."""
    images = images_of(render_overlay(env, image, root))
    others = sorted(images - {str(image)})
    if not others:
        return None
    unpullable = [problem for other in others if (problem := placeholder_problem(other))]
    return (f"overlays/{env} would still run {', '.join(others)} besides {image}"
            + (f" ({'; '.join(unpullable)})" if unpullable else "")
            + f": deploy sets the image through the `images:` entry named {PLACEHOLDER}; an overlay whose entry was "
            "renamed (`kustomize edit set image` for plain `kubectl apply -k`) keeps its own: "
            f"`git checkout overlays/{env}/kustomization.yaml`, then deploy again")


def plan_deploy(env: str, component: str, image: ImageRef, *, mlflow_env: Path | None = None, wait: bool = True,
                root: Path = REPO, environ: Mapping[str, str] | None = None) -> Plan:
    if component not in COMPONENTS:
        raise Exit(f"--component must be one of {', '.join(COMPONENTS)}, not {component!r}")
    if env == "prod" and image.digest is None:
        raise Exit("prod pins the image by digest: pass --digest sha256:... or let deploy look it up")
    steps, notes = mlflow_env_steps(env, mlflow_env, root)
    if image.tag and image.tag.endswith("-dirty"):
        notes.append(f"{image.tag} was built from uncommitted changes: fine for {env}, refused for prod")
    wrapper = wrapper_step(env, image)
    apply = Command(("kubectl", "apply", "-k", str(deploy_dir(env)), "-l", SELECTORS[component]))
    plan_steps = [*steps, wrapper, apply]
    if component in ("all", "webui") and wait:
        plan_steps.append(Command(("kubectl", "rollout", "status", f"deployment/{WEBUI}", "-n", NAMESPACE,
                                   f"--timeout={ROLLOUT_TIMEOUT}")))
    title = (f"deploy overlays/{env} ({component}: {COMPONENTS[component]}) with image {image} "
             f"to kube context {current_context(environ)}")
    checks = [kubeconfig_problem, functools.partial(image_problem, env, image)]
    return Plan(title, plan_steps, checks=checks, notes=notes)
