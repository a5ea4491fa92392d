"""The kustomize overlays: choosing one, rendering it with `kubectl kustomize`, setting the image in one place.

The image is set by a generated kustomization that takes the overlay as its only resource and adds one
`images:` entry (`build/deploy/<env>/kustomization.yaml`, untracked). Kustomize renders that exactly as if
the overlay's own `images:` said so, including the Job identity hashes (components/job-identity): a test
compares both renders. The tracked overlay files are never edited.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml
from invoke.exceptions import Exit

from k8s_tasks.image import PLACEHOLDER, ImageRef
from k8s_tasks.plan import WriteFile
from k8s_tasks.tools import REPO, require_tool

ENVS = ("dev", "gpu", "prod", "multinode")
NAMESPACE = "llm-training"
# Every kustomization of the repository: what renders copy, and what `invoke validate` and the tests check.
# admin/ holds the one-time admin step of `invoke prepare-storage`, applied by that task only.
KUSTOMIZE_DIRS = ("base", "components", "overlays", "admin")
COMPONENT_LABEL = "app.kubernetes.io/component"
# What `deploy --component` applies, as kubectl label selectors over the rendered objects (the original design's
# all/base/webui split). The Jobs are never applied by deploy: `invoke train` and `invoke merge` start them
# under unique names. Objects without the label (namespace, config, Secret, storage, policies) are "base".
SELECTORS = {
    "all": f"{COMPONENT_LABEL} notin (train,merge)",
    "base": f"{COMPONENT_LABEL} notin (train,merge,webui)",
    "webui": f"{COMPONENT_LABEL}=webui",
}
DEPLOY_DIR = Path("build/deploy")
# Components an overlay adds for cheaper GPUs, one line each after components/gpu (README "Cheaper GPUs"), and
# the combinations that make sense: a node is Spot or flex-start, never both. `invoke validate` and the
# manifest tests render every overlay with each of them.
COMBINATIONS = (("spot",), ("kueue",), ("flex-start",), ("spot", "kueue"), ("kueue", "flex-start"))
_AFTER = "  - ../../components/gpu\n"


def check_env(env: str | None) -> str:
    if env not in ENVS:
        raise Exit(f"--env must be one of {', '.join(ENVS)} (the overlays in overlays/), not {env!r}")
    return env


def deploy_dir(env: str) -> Path:
    return DEPLOY_DIR / env


def wrapper_kustomization(env: str, image: ImageRef) -> dict[str, Any]:
    """The overlay as the only resource, with the image set: the one place deploy sets it."""
    entry: dict[str, str] = {"name": PLACEHOLDER, "newName": image.repository}
    if image.digest:
        entry["digest"] = image.digest
    else:
        entry["newTag"] = str(image.tag)
    # Relative to build/deploy/<env>/, three levels below the repository root.
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"../../../overlays/{env}"],
        "images": [entry],
    }


def wrapper_step(env: str, image: ImageRef) -> WriteFile:
    header = (f"# Written by `invoke deploy --env={env}`: overlays/{env} with the image it deploys. "
              "Not tracked; rewritten by every deploy.\n")
    content = header + yaml.safe_dump(wrapper_kustomization(env, image), sort_keys=False)
    return WriteFile(deploy_dir(env) / "kustomization.yaml", content, f"overlays/{env} with image {image}")


def copy_tree(dest: Path, root: Path = REPO) -> Path:
    """base/, components/, overlays/, admin/ copied to dest, each overlay's mlflow.env made from its example.

    Renders made from the copy never read (or leak) a user's real secret file, and work in a fresh clone.
    """
    for name in KUSTOMIZE_DIRS:
        shutil.copytree(root / name, dest / name, ignore=shutil.ignore_patterns("mlflow.env"))
    for example in (dest / "overlays").glob("*/mlflow.env.example"):
        shutil.copyfile(example, example.with_name("mlflow.env"))
    return dest


def with_components(kustomization: str, components: tuple[str, ...]) -> str:
    """An overlay's kustomization.yaml with the components added: one line each, after components/gpu."""
    if _AFTER not in kustomization:
        raise Exit(f"the overlay does not list components/gpu, after which components {components} go")
    return kustomization.replace(_AFTER, _AFTER + "".join(f"  - ../../components/{c}\n" for c in components), 1)


def combination_name(env: str, components: tuple[str, ...]) -> str:
    return "+".join((env, *components))


def add_combinations(tree: Path) -> list[str]:
    """Beside each overlay of a copied tree (copy_tree), one overlay per combination of COMBINATIONS, named
    <env>+<component>...: the overlay's own files, its kustomization with the components added."""
    names = []
    for env in ENVS:
        for components in COMBINATIONS:
            name = combination_name(env, components)
            shutil.copytree(tree / "overlays" / env, tree / "overlays" / name)
            kustomization = tree / "overlays" / name / "kustomization.yaml"
            kustomization.write_text(with_components(kustomization.read_text(), components), encoding="utf-8")
            names.append(name)
    return names


def render(path: Path, kubectl: str | None = None) -> str:
    """`kubectl kustomize path` (kubectl found by require_tool unless given)."""
    result = subprocess.run([kubectl or require_tool("kubectl"), "kustomize", str(path)], capture_output=True,
                            text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise Exit(f"`kubectl kustomize {path}` failed:\n{result.stderr.strip()}")
    return result.stdout


def render_envs(tree: Path) -> dict[str, str]:
    """Every overlay of a copied tree (copy_tree) rendered: what the reviewed renders in tests/manifests hold."""
    kubectl = require_tool("kubectl")
    return {env: render(tree / "overlays" / env, kubectl) for env in ENVS}


def parse(text: str) -> list[dict[str, Any]]:
    # libyaml's loader when PyYAML has it: renders are a few thousand lines, parsed several times per task.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(text, Loader=loader) if doc]


def render_overlay(env: str, image: ImageRef | None = None, root: Path = REPO) -> list[dict[str, Any]]:
    """The overlay's objects, rendered offline from a copy with example secrets; with `image` set if given."""
    kubectl = require_tool("kubectl")
    with tempfile.TemporaryDirectory(prefix="llama-render-") as tmp:
        tree = copy_tree(Path(tmp), root)
        target = tree / "overlays" / env
        if image is not None:
            step = wrapper_step(env, image)
            target = tree / step.path.parent
            target.mkdir(parents=True)
            (tree / step.path).write_text(step.content, encoding="utf-8")
        return parse(render(target, kubectl))


def images_of(docs: list[dict[str, Any]]) -> set[str]:
    """Every container image of the workloads' pod templates."""
    found = set()
    for doc in docs:
        spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
        found |= {c["image"] for c in [*spec.get("initContainers", []), *spec.get("containers", [])]}
    return found


def component_of(doc: dict[str, Any]) -> str | None:
    return ((doc.get("metadata") or {}).get("labels") or {}).get(COMPONENT_LABEL)


def find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind and (component is None or component_of(d) == component)]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, component)
    if len(found) != 1:
        names = [d["metadata"]["name"] for d in found]
        raise Exit(f"the overlay should render one {kind} {component or ''}, found {names}")
    return found[0]
