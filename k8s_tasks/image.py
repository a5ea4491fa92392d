"""The image: its registry (from PROJECT_ID, REGION, REPOSITORY), its tag (from git), build and push plans."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

from invoke.exceptions import Exit

from k8s_tasks.plan import Command, Plan
from k8s_tasks.tools import REPO, find_tool, missing_tool_message, require_tool

IMAGE_NAME = "llama-factory-train"
# The image name in base/ and in every overlay's `images:` entry: Artifact Registry's layout with its three
# parts still to fill in. Deploy replaces it with the real one; an overlay applied with it never pulls.
PLACEHOLDER = f"REGION-docker.pkg.dev/PROJECT/REPOSITORY/{IMAGE_NAME}"
DOCKERFILE = "docker/Dockerfile"
# GKE GPU nodes are x86-64; without it a build on an arm64 laptop would give an image the nodes cannot run.
PLATFORM = "linux/amd64"
# How each builder builds docker/Dockerfile: buildah needs no daemon, chroot isolation no OCI runtime, and
# the Docker format keeps what the OCI format drops (HEALTHCHECK), so both builders give the same image.
BUILDERS = {
    "docker": ("docker", "build"),
    "buildah": ("buildah", "bud", "--isolation", "chroot", "--format", "docker"),
}
# The Dockerfile's build arguments BASE_IMAGE and TORCH_VARIANT, and their defaults there.
DEFAULT_BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
DEFAULT_TORCH_VARIANT = "cu128"
# A PyTorch wheel index: download.pytorch.org/whl/<variant>.
_TORCH_VARIANT = re.compile(r"cpu|cu\d{3}")

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# GCP project ids (6-30 characters), optionally domain-scoped ("example.com:my-project").
_PROJECT = re.compile(r"(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_REGION = re.compile(r"[a-z]+-[a-z]+\d+")
_AR_REPOSITORY = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
# Container Registry (gcr.io and its regional hosts) was shut down in 2025: no image is pushed there.
_CONTAINER_REGISTRY = re.compile(r"(?:[a-z]+\.)?gcr\.io/")

REGISTRY_UNSET = (
    "{names} not set: the image lives in Artifact Registry, <REGION>-docker.pkg.dev/<PROJECT_ID>/<REPOSITORY>/"
    f"{IMAGE_NAME}: `export PROJECT_ID=<your GCP project> REGION=<its region, such as europe-west4> "
    "REPOSITORY=<a Docker repository there>` (create one with `gcloud artifacts repositories create "
    "REPOSITORY --repository-format=docker --location=REGION`)"
)


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """An image reference: repository plus a tag or a digest (a digest wins when both are known)."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        if "@" in text:
            repository, digest = text.split("@", 1)
            return cls(repository, digest=digest)
        # A ':' after the last '/' starts the tag (one before it belongs to a registry port).
        slash = text.rfind("/")
        colon = text.rfind(":")
        if colon > slash:
            return cls(text[:colon], tag=text[colon + 1 :])
        return cls(text)


def repository(environ: Mapping[str, str] | None = None) -> str:
    """Where the image lives: <REGION>-docker.pkg.dev/<PROJECT_ID>/<REPOSITORY>/llama-factory-train."""
    environ = os.environ if environ is None else environ
    values = {name: environ.get(name, "").strip() for name in ("PROJECT_ID", "REGION", "REPOSITORY")}
    unset = [name for name, value in values.items() if not value]
    if unset:
        names = " and ".join(unset) + (" is" if len(unset) == 1 else " are")
        raise Exit(REGISTRY_UNSET.format(names=names))
    project, region, repo = values.values()
    if not _PROJECT.fullmatch(project):
        raise Exit(f"PROJECT_ID {project!r} is not a GCP project id (6-30 lowercase letters, digits, hyphens)")
    if not _REGION.fullmatch(region):
        raise Exit(f"REGION {region!r} is not a GCP region (such as europe-west4)")
    if not _AR_REPOSITORY.fullmatch(repo):
        raise Exit(f"REPOSITORY {repo!r} is not an Artifact Registry repository name (lowercase letters, digits, -)")
    path = project.replace(":", "/")  # domain-scoped projects: example.com/my-project
    return f"{region}-docker.pkg.dev/{path}/{repo}/{IMAGE_NAME}"


def placeholder_problem(image: str) -> str | None:
    """Why a rendered image can never be pulled (the placeholder, an all-zero digest, Container Registry)."""
    ref = ImageRef.parse(image)
    if ref.repository == PLACEHOLDER:
        return f"{image} is the placeholder: REGION, PROJECT and REPOSITORY are still to be filled in"
    if ref.digest and set(ref.digest.removeprefix("sha256:")) == {"0"}:
        return f"{image} pins the all-zero placeholder digest"
    if _CONTAINER_REGISTRY.match(ref.repository):
        return f"{image} is in Container Registry (gcr.io), which was shut down in 2025: use Artifact Registry"
    return None


def validate_tag(tag: str) -> str:
    if tag == "latest":
        raise Exit("the tag `latest` is never deployed: tags come from git (<shortsha> or <shortsha>-dirty)")
    if not _TAG.fullmatch(tag):
        raise Exit(f"{tag!r} is not a Docker tag: at most 128 letters, digits, '_', '.', '-', not starting with . or -")
    return tag


def validate_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise Exit(f"{digest!r} is not an image digest (sha256: and 64 hex digits)")
    return digest


@dataclasses.dataclass(frozen=True)
class GitState:
    revision: str  # the full commit id
    tag: str  # <shortsha>, or <shortsha>-dirty when the work tree differs from the commit


def git_state(root: Path = REPO, environ: Mapping[str, str] | None = None) -> GitState:
    """The commit and the image tag for it. Untracked files count as changes: `docker build` would copy them."""
    git = require_tool("git", environ)

    def git_output(*args: str) -> str:
        result = subprocess.run([git, "-C", str(root), *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise Exit(f"cannot tag the image from git (`git {' '.join(args)}`: {result.stderr.strip()}); "
                       "pass --tag")
        return result.stdout.strip()

    revision = git_output("rev-parse", "HEAD")
    short = git_output("rev-parse", "--short=12", "HEAD")
    dirty = bool(git_output("status", "--porcelain"))
    return GitState(revision, f"{short}-dirty" if dirty else short)


def build_plan(ref: ImageRef, revision: str, builder: str = "docker", base_image: str | None = None,
               torch_variant: str | None = None) -> Plan:
    """Build docker/Dockerfile with the repository root as context (.dockerignore narrows it), by docker or
    buildah; the build arguments only when they differ from the Dockerfile's defaults."""
    if builder not in BUILDERS:
        raise Exit(f"--builder must be one of {', '.join(BUILDERS)}, not {builder!r}")
    build_args = []
    if base_image is not None:
        if not base_image.strip() or any(c.isspace() for c in base_image):
            raise Exit(f"--base-image {base_image!r} is not an image reference (such as {DEFAULT_BASE_IMAGE})")
        build_args += ["--build-arg", f"BASE_IMAGE={base_image}"]
    if torch_variant is not None:
        if not _TORCH_VARIANT.fullmatch(torch_variant):
            raise Exit(f"--torch-variant {torch_variant!r} is not a PyTorch wheel variant: cpu, or cu and the "
                       f"CUDA version's digits (such as {DEFAULT_TORCH_VARIANT})")
        build_args += ["--build-arg", f"TORCH_VARIANT={torch_variant}"]
    argv = (
        *BUILDERS[builder],
        "--platform", PLATFORM,
        "--file", DOCKERFILE,
        "--tag", str(ref),
        "--label", f"org.opencontainers.image.revision={revision}",
        "--label", f"org.opencontainers.image.version={ref.tag}",
        *build_args,
        ".",
    )  # fmt: skip
    notes = []
    if ref.tag and ref.tag.endswith("-dirty"):
        notes.append("the work tree has uncommitted changes: this image cannot be rebuilt from git, "
                     "and `invoke deploy --env=prod` refuses it")
    if torch_variant == "cpu":
        notes.append("torch without CUDA: this image trains on CPUs only, never on the GPU nodes")
    if builder == "buildah":
        notes.append(f"the image is in buildah's store, where `invoke push` (docker) cannot see it: "
                     f"`buildah push {ref}` pushes it")
    return Plan(f"build {ref}", [Command(argv)], notes=notes)


def push_plan(ref: ImageRef) -> Plan:
    """docker push, after checking that the image is built here and docker can log in to its registry."""
    host = ref.repository.split("/", 1)[0]
    steps = [
        Command(("docker", "push", str(ref))),
        # Prints the pushed digest (what overlays/prod pins): <repository>@sha256:...
        Command(("docker", "image", "inspect", "--format", '{{join .RepoDigests "\\n"}}', str(ref))),
    ]
    checks = [functools.partial(docker_credentials_problem, host), functools.partial(image_missing_problem, ref)]
    return Plan(f"push {ref}", steps, checks)


def docker_config(environ: Mapping[str, str] | None = None) -> dict:
    environ = os.environ if environ is None else environ
    directory = Path(environ.get("DOCKER_CONFIG") or Path(environ.get("HOME", str(Path.home()))) / ".docker")
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def docker_credentials_problem(host: str, root: Path = REPO, environ: Mapping[str, str] | None = None) -> str | None:
    """Why `docker push` to host would be refused for lack of credentials, or None when it has some."""
    config = docker_config(environ)
    helper = (config.get("credHelpers") or {}).get(host)
    if helper:
        if find_tool(f"docker-credential-{helper}", environ) is None:
            return (f"docker gets credentials for {host} from docker-credential-{helper}, which is not on PATH: "
                    + ("install the Google Cloud CLI and `gcloud auth login`" if helper == "gcloud"
                       else f"install docker-credential-{helper}"))
        if helper == "gcloud":
            return gcloud_account_problem(environ)
        return None
    if host in (config.get("auths") or {}) or config.get("credsStore"):
        return None
    return f"docker has no credentials for {host}: run `gcloud auth configure-docker {host}`"


def gcloud_account_problem(environ: Mapping[str, str] | None = None) -> str | None:
    gcloud = find_tool("gcloud", environ)
    if gcloud is None:
        return missing_tool_message("gcloud")
    result = subprocess.run([gcloud, "auth", "list", "--filter=status:ACTIVE", "--format=value(account)"],
                            capture_output=True, text=True, check=False, env=None if environ is None else dict(environ))
    if result.returncode != 0 or not result.stdout.strip():
        return "gcloud has no active account: run `gcloud auth login`"
    return None


def image_missing_problem(ref: ImageRef, root: Path = REPO, environ: Mapping[str, str] | None = None) -> str | None:
    docker = find_tool("docker", environ) or "docker"
    result = subprocess.run([docker, "image", "inspect", "--format", "{{.Id}}", str(ref)],
                            capture_output=True, text=True, check=False, env=None if environ is None else dict(environ))
    if result.returncode != 0:
        return f"{ref} is not built on this machine: run `invoke build` first (same commit, same tag)"
    return None


def resolve_digest(ref: ImageRef, environ: Mapping[str, str] | None = None) -> str:
    """The registry's digest for ref: what `deploy --env=prod` pins, so the running image cannot change."""
    docker = find_tool("docker", environ)
    if docker is None:
        raise Exit(f"prod pins the image by digest, and looking it up needs docker: {missing_tool_message('docker')}; "
                   "or pass --digest sha256:...")
    env = None if environ is None else dict(environ)
    if subprocess.run([docker, "buildx", "version"], capture_output=True, check=False, env=env).returncode != 0:
        raise Exit("prod pins the image by digest, and looking it up needs docker's buildx plugin "
                   "(`docker buildx version` fails): install it, or pass --digest sha256:...")
    result = subprocess.run(
        [docker, "buildx", "imagetools", "inspect", str(ref), "--format", "{{json .Manifest}}"],
        capture_output=True, text=True, check=False, env=env,
    )
    if result.returncode != 0:
        raise Exit(f"cannot find {ref} in its registry ({result.stderr.strip() or 'no answer'}): "
                   "push it first (`invoke push`), or pass --digest sha256:...")
    try:
        digest = json.loads(result.stdout)["digest"]
    except (ValueError, KeyError, TypeError):
        raise Exit(f"unexpected answer from `docker buildx imagetools inspect {ref}`: {result.stdout[:200]}") from None
    return validate_digest(digest)
