"""`invoke validate`: render every overlay offline and run the checks CI runs on them.

Renders a copy of the tree whose mlflow.env files come from the examples (as tests/manifests does), so it
works in a fresh clone and never reads a real secret.
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

from k8s_tasks.image import PLACEHOLDER, ImageRef
from k8s_tasks.overlays import ENVS, copy_tree, parse, render, wrapper_step
from k8s_tasks.tools import REPO, require_tool

# Oldest and newest Kubernetes minors supported (tests/manifests checks them too): 1.31 is the first with
# podFailurePolicy GA (the Jobs depend on it); 1.37 is the newest schema kubernetes-validate ships. GKE's
# channels lie in between.
K8S_MINORS = ("1.31", "1.37")
# Stand-ins for what deploy sets, to check that it replaces every image.
SAMPLE_TAG = ImageRef("eu.gcr.io/example-project/llama-factory-train", tag="0123456789ab")
SAMPLE_DIGEST = ImageRef("eu.gcr.io/example-project/llama-factory-train", digest="sha256:" + "1" * 64)


def _run(argv: list[str], what: str, out: TextIO, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    print(f"- {what}", file=out, flush=True)
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env, cwd=cwd)
    if result.returncode != 0:
        raise Exit(f"{what} failed:\n{(result.stdout + result.stderr).strip()[-4000:]}")


def _images(docs: list[dict]) -> set[str]:
    found = set()
    for doc in docs:
        spec = (doc.get("spec") or {}).get("template", {}).get("spec") or {}
        found |= {c["image"] for c in spec.get("containers", [])}
    return found


def validate(out: TextIO, root: Path = REPO) -> None:
    """Check the tree under root (this checkout by default) with the tools this checkout has."""
    kubectl = require_tool("kubectl")
    checkov = require_tool("checkov")
    if importlib.util.find_spec("kubernetes_validate") is None:
        raise Exit("kubernetes-validate is not installed: `pip install -e '.[dev]'` (or `./dev.sh setup`)")
    with tempfile.TemporaryDirectory(prefix="llama-validate-") as tmp:
        tree = copy_tree(Path(tmp) / "tree", root)
        renders = []
        for env in ENVS:
            print(f"- render overlays/{env}", file=out, flush=True)
            text = render(tree / "overlays" / env, kubectl)
            path = Path(tmp) / f"{env}.yaml"
            path.write_text(text, encoding="utf-8")
            renders.append(str(path))
            sample = SAMPLE_DIGEST if env == "prod" else SAMPLE_TAG
            step = wrapper_step(env, sample)
            (tree / step.path).parent.mkdir(parents=True, exist_ok=True)
            (tree / step.path).write_text(step.content, encoding="utf-8")
            images = _images(parse(render(tree / step.path.parent, kubectl)))
            print(f"- deploy sets the image of overlays/{env}: {', '.join(sorted(images))}", file=out, flush=True)
            if images != {str(sample)}:
                raise Exit(f"deploy would leave other images in overlays/{env} ({images}); every workload must "
                           f"use {PLACEHOLDER}, which deploy replaces")
        shutil.rmtree(tree / "build")  # the deploy wrappers are not part of what checkov lints
        for minor in K8S_MINORS:
            _run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", minor, *renders],
                 f"kubernetes-validate --strict against Kubernetes {minor}", out)
        # checkov renders kustomizations with the kubectl on its PATH, and silently skips them without one.
        env = {**os.environ, "PATH": f"{Path(kubectl).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        _run([checkov, "-d", str(tree), "--framework", "kustomize", "--skip-download", "--compact", "--quiet"],
             "checkov --framework kustomize (base, components, every overlay)", out, env=env, cwd=tree)
        _run([checkov, "-f", str(root / "docker" / "Dockerfile"), "--framework", "dockerfile", "--skip-download",
              "--compact", "--quiet"], "checkov --framework dockerfile (docker/Dockerfile)", out)
    print("validate: every overlay renders, is valid Kubernetes, and passes checkov", file=out)
