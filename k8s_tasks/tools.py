"""Finding the command-line tools the tasks call, and saying what to do when one is missing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from invoke.exceptions import Exit

REPO = Path(__file__).resolve().parent.parent

# What to do when a tool is missing: one line a user can act on.
REMEDIES = {
    "docker": "install Docker (https://docs.docker.com/engine/install/) and start its daemon",
    "buildah": "install buildah (Debian and Ubuntu: `apt-get install buildah`; https://buildah.io)",
    "kubectl": (
        "install kubectl (`gcloud components install kubectl`, or https://kubernetes.io/docs/tasks/tools/), "
        "or run `bash scripts/ensure-tools.sh`, which puts one in ./.tools/bin"
    ),
    "git": "install git: image tags come from the commit (`git rev-parse`)",
    "gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then `gcloud auth login`",
    "gke-gcloud-auth-plugin": (
        "your kubeconfig authenticates through it: `gcloud components install gke-gcloud-auth-plugin`"
    ),
    "checkov": "run `bash scripts/ensure-tools.sh` (installs it into ./.venv-checkov)",
}
# Where scripts/ensure-tools.sh installs tools that are not on PATH.
FALLBACKS = {
    "kubectl": Path(".tools/bin/kubectl"),
    "checkov": Path(".venv-checkov/bin/checkov"),
}


def find_tool(name: str, environ: Mapping[str, str] | None = None, tools_root: Path = REPO) -> str | None:
    """Path of a tool: from PATH, else from where scripts/ensure-tools.sh put it in this checkout; None when
    missing."""
    environ = os.environ if environ is None else environ
    found = shutil.which(name, path=environ.get("PATH", ""))
    if found:
        return found
    fallback = FALLBACKS.get(name)
    if fallback is not None:
        candidate = tools_root / fallback
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_tool_message(name: str) -> str:
    return f"{name} not found on PATH: {REMEDIES.get(name, f'install {name}')}"


def require_tool(name: str, environ: Mapping[str, str] | None = None, tools_root: Path = REPO) -> str:
    """Path of a tool the task cannot do without; a clear Exit when it is missing."""
    found = find_tool(name, environ, tools_root)
    if found is None:
        raise Exit(missing_tool_message(name))
    return found
