"""`invoke validate`: render every overlay offline and run the checks CI runs on them.

Renders a copy of the tree whose mlflow.env files come from the examples (as tests/manifests does), so it
works in a fresh clone and never reads a real secret; every overlay also with each combination of the
components for cheaper GPUs (overlays.COMBINATIONS), each added as `kubectl apply -k` users would add it. With
an overlay named, it checks that overlay as `kubectl apply -k overlays/<env>` would apply it: it fails while an
image there is still a placeholder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from invoke.exceptions import Exit

from k8s_tasks.image import PLACEHOLDER, ImageRef, placeholder_problem
from k8s_tasks.overlays import ENVS, add_combinations, copy_tree, images_of, parse, render, wrapper_step
from k8s_tasks.storage_owner import ADMIN_DIR
from k8s_tasks.tools import REPO, require_tool

# Oldest and newest Kubernetes minors supported (tests/manifests checks them too): 1.31 is the first with
# podFailurePolicy GA (the Jobs depend on it); 1.37 is the newest schema kubernetes-validate ships. GKE's
# channels lie in between.
K8S_MINORS = ("1.31", "1.37")
# Stand-ins for what deploy sets, to check that it replaces every image.
SAMPLE_REPOSITORY = "europe-west4-docker.pkg.dev/example-project/training/llama-factory-train"
SAMPLE_TAG = ImageRef(SAMPLE_REPOSITORY, tag="0123456789ab")
SAMPLE_DIGEST = ImageRef(SAMPLE_REPOSITORY, digest="sha256:" + "1" * 64)
SET_IMAGE_HINT = (
    "set it first: `(cd overlays/{env} && kustomize edit set image {placeholder}=<REGION>-docker.pkg.dev/"
    "<PROJECT_ID>/<REPOSITORY>/llama-factory-train:<tag>)`, or `invoke deploy --env={env}`, which sets it "
    "without editing the overlay"
)


def _run(argv: list[str], what: str, out: TextIO, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    print(f"- {what}", file=out, flush=True)
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env, cwd=cwd)
    if result.returncode != 0:
        raise Exit(f"{what} failed:\n{(result.stdout + result.stderr).strip()[-4000:]}")


def unpullable_images(docs: list[dict]) -> list[str]:
    """Why each image of a render can never be pulled (placeholders), one line per image."""
    return [problem for image in sorted(images_of(docs)) if (problem := placeholder_problem(image)) is not None]


def validate(out: TextIO, root: Path = REPO, env: str | None = None) -> None:
    """Check the tree under root (this checkout by default) with the tools this checkout has.

    `env`: check only that overlay, as `kubectl apply -k overlays/<env>` applies it (its own image).
    """
    kubectl = require_tool("kubectl")
    checkov = require_tool("checkov")
    if importlib.util.find_spec("kubernetes_validate") is None:
        raise Exit("kubernetes-validate is not installed: `pip install -e '.[dev]'` (or `./dev.sh setup`)")
    with tempfile.TemporaryDirectory(prefix="llama-validate-") as tmp:
        tree = copy_tree(Path(tmp) / "tree", root)
        renders = []
        for name in ENVS if env is None else (env,):
            print(f"- render overlays/{name}", file=out, flush=True)
            text = render(tree / "overlays" / name, kubectl)
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(text, encoding="utf-8")
            renders.append(str(path))
            if env is not None:
                problems = unpullable_images(parse(text))
                if problems:
                    raise Exit(f"`kubectl apply -k overlays/{env}` would start pods that can never pull their "
                               f"image:\n  " + "\n  ".join(problems) + "\n"
                               + SET_IMAGE_HINT.format(env=env, placeholder=PLACEHOLDER))
                print(f"- overlays/{env} names pullable images: {', '.join(sorted(images_of(parse(text))))}",
                      file=out, flush=True)
                continue
            sample = SAMPLE_DIGEST if name == "prod" else SAMPLE_TAG
            step = wrapper_step(name, sample)
            (tree / step.path).parent.mkdir(parents=True, exist_ok=True)
            (tree / step.path).write_text(step.content, encoding="utf-8")
            images = images_of(parse(render(tree / step.path.parent, kubectl)))
            print(f"- deploy sets the image of overlays/{name}: {', '.join(sorted(images))}", file=out, flush=True)
            if images != {str(sample)}:
                raise Exit(f"deploy would leave other images in overlays/{name} ({images}); every workload must "
                           f"use {PLACEHOLDER}, which deploy replaces")
        if env is None:
            # The one-time root Job of `invoke prepare-storage`: applied by that task only, checked all the same.
            print(f"- render {ADMIN_DIR}", file=out, flush=True)
            path = Path(tmp) / "storage-owner.yaml"
            path.write_text(render(tree / ADMIN_DIR, kubectl), encoding="utf-8")
            renders.append(str(path))
        shutil.rmtree(tree / "build", ignore_errors=True)  # the deploy wrappers are not part of what checkov lints
        for name in add_combinations(tree) if env is None else ():
            print(f"- render overlays/{name.replace('+', ' + components/')}", file=out, flush=True)
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(render(tree / "overlays" / name, kubectl), encoding="utf-8")
            renders.append(str(path))
        for minor in K8S_MINORS:
            _run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", minor, *renders],
                 f"kubernetes-validate --strict against Kubernetes {minor}", out)
        # checkov renders kustomizations with the kubectl on its PATH, and silently skips them without one.
        tool_env = {**os.environ, "PATH": f"{Path(kubectl).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        _run([checkov, "-d", str(tree), "--framework", "kustomize", "--skip-download", "--compact", "--quiet"],
             "checkov --framework kustomize (base, components, every overlay and combination, admin)", out,
             env=tool_env, cwd=tree)
        _run([checkov, "-f", str(root / "docker" / "Dockerfile"), "--framework", "dockerfile", "--skip-download",
              "--compact", "--quiet"], "checkov --framework dockerfile (docker/Dockerfile)", out)
    what = ("every overlay renders, alone and with components/spot, kueue and flex-start" if env is None
            else f"overlays/{env} renders with pullable images")
    print(f"validate: {what}, is valid Kubernetes, and passes checkov", file=out)
