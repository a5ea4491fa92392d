"""Image names and tags: the registry from the environment, the tag from git, and what deploy refuses."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from invoke.exceptions import Exit

from k8s_tasks.deploy import deploy_image
from k8s_tasks.image import (
    PLACEHOLDER,
    ImageRef,
    docker_credentials_problem,
    git_state,
    placeholder_problem,
    repository,
    validate_tag,
)

REGISTRY_ENV = {"PROJECT_ID": "my-project", "REGION": "europe-west4", "REPOSITORY": "training"}
AR = "europe-west4-docker.pkg.dev/my-project/training/llama-factory-train"


def test_the_image_lives_in_artifact_registry() -> None:
    # Container Registry (gcr.io) was shut down in 2025: there is no default there any more.
    assert repository(REGISTRY_ENV) == AR


def test_domain_scoped_projects_become_a_path() -> None:
    assert repository({**REGISTRY_ENV, "PROJECT_ID": "example.com:my-project"}) == \
        "europe-west4-docker.pkg.dev/example.com/my-project/training/llama-factory-train"


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (f"{PLACEHOLDER}:0.1.0", "is the placeholder"),
        (f"{AR}@sha256:" + "0" * 64, "all-zero placeholder digest"),
        ("eu.gcr.io/my-project/llama-factory-train:0123456789ab", "Container Registry (gcr.io), which was shut down"),
        ("gcr.io/my-project/llama-factory-train:0123456789ab", "Container Registry"),
        (f"{AR}:0123456789ab", None),
        (f"{AR}@sha256:" + "ab" * 32, None),
    ],
)
def test_images_that_can_never_be_pulled_are_named(image: str, problem: str | None) -> None:
    found = placeholder_problem(image)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "PROJECT_ID and REGION and REPOSITORY are not set: the image lives in Artifact Registry"),
        ({**REGISTRY_ENV, "PROJECT_ID": "  "}, "PROJECT_ID is not set: "),
        ({"PROJECT_ID": "my-project", "REGION": "europe-west4"}, "REPOSITORY is not set: "),
        ({"PROJECT_ID": "my-project", "REPOSITORY": "training"}, "REGION is not set: "),
        ({**REGISTRY_ENV, "PROJECT_ID": "My Project"}, "not a GCP project id"),
        ({**REGISTRY_ENV, "REGION": "Europe West"}, "not a GCP region"),
        ({**REGISTRY_ENV, "REPOSITORY": "Training"}, "not an Artifact Registry repository name"),
    ],
)
def test_registry_settings_that_cannot_work_say_what_to_set(environ: dict[str, str], message: str) -> None:
    with pytest.raises(Exit) as raised:
        repository(environ)
    assert message in raised.value.message


@pytest.mark.parametrize("tag", ["latest", "", "-x", "a b", "x" * 129])
def test_bad_tags_are_refused(tag: str) -> None:
    with pytest.raises(Exit):
        validate_tag(tag)


def test_image_refs_parse_registry_ports_tags_and_digests() -> None:
    assert ImageRef.parse("localhost:5000/a/b:tag") == ImageRef("localhost:5000/a/b", tag="tag")
    assert ImageRef.parse("r.example/p/i@sha256:" + "0" * 64) == ImageRef("r.example/p/i", digest="sha256:" + "0" * 64)
    assert str(ImageRef("r", tag="t", digest="sha256:x")) == "r@sha256:x"


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    root.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for argv in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "one"]):
        if argv[0] == "add":
            (root / "file.txt").write_text("one\n")
        subprocess.run(["git", "-C", str(root), *argv], check=True, env=env)
    return root


def test_tag_is_the_short_commit_and_dirty_when_anything_changed(git_repo: Path) -> None:
    clean = git_state(git_repo)
    full = subprocess.run(["git", "-C", str(git_repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert clean.revision == full
    assert clean.tag == full[:12]
    (git_repo / "file.txt").write_text("two\n")
    assert git_state(git_repo).tag == f"{full[:12]}-dirty"
    (git_repo / "file.txt").write_text("one\n")
    (git_repo / "new.py").write_text("")  # untracked: docker build would copy it
    assert git_state(git_repo).tag.endswith("-dirty")


def test_no_git_repository_says_to_pass_a_tag(tmp_path: Path) -> None:
    with pytest.raises(Exit, match="pass --tag"):
        git_state(tmp_path)


def test_prod_refuses_a_dirty_build(git_repo: Path) -> None:
    (git_repo / "file.txt").write_text("changed\n")
    with pytest.raises(Exit, match="prod deploys only committed builds"):
        deploy_image("prod", root=git_repo, environ={**os.environ, **REGISTRY_ENV})


def test_prod_without_digest_and_without_docker_says_what_to_do(git_repo: Path) -> None:
    environ = {"PATH": str(git_repo), **REGISTRY_ENV}  # no docker on this PATH
    with pytest.raises(Exit) as raised:
        deploy_image("prod", tag="0123456789ab", root=git_repo, environ=environ)
    assert "docker not found on PATH" in raised.value.message
    assert "--digest" in raised.value.message


def test_dev_deploys_the_commit_and_prod_a_given_digest(git_repo: Path) -> None:
    environ = {**os.environ, **REGISTRY_ENV}
    state = git_state(git_repo)
    assert deploy_image("dev", root=git_repo, environ=environ) == ImageRef(AR, state.tag)
    digest = "sha256:" + "c" * 64
    assert deploy_image("prod", digest=digest, root=git_repo, environ=environ).digest == digest
    with pytest.raises(Exit, match="not an image digest"):
        deploy_image("prod", digest="sha256:short", root=git_repo, environ=environ)


def _docker_config(tmp_path: Path, text: str) -> dict[str, str]:
    (tmp_path / "config.json").write_text(text)
    return {"PATH": str(tmp_path), "DOCKER_CONFIG": str(tmp_path)}


def test_push_without_registry_credentials_says_how_to_get_them(tmp_path: Path) -> None:
    host = "europe-west4-docker.pkg.dev"
    environ = _docker_config(tmp_path, "{}")
    assert docker_credentials_problem(host, tmp_path, environ) == \
        f"docker has no credentials for {host}: run `gcloud auth configure-docker {host}`"
    environ = _docker_config(tmp_path, f'{{"credHelpers": {{"{host}": "gcloud"}}}}')
    problem = docker_credentials_problem(host, tmp_path, environ)
    assert "docker-credential-gcloud, which is not on PATH" in problem
    assert "gcloud auth login" in problem
    environ = _docker_config(tmp_path, f'{{"auths": {{"{host}": {{}}}}}}')
    assert docker_credentials_problem(host, tmp_path, environ) is None


def _fake_docker(folder: Path, buildx: bool) -> dict[str, str]:
    """A FAKE docker CLI (no Docker here) answering the two calls the digest lookup makes, as docker does."""
    folder.mkdir()
    script = folder / "docker"
    answers = (
        'if [ "$1 $2" = "buildx version" ]; then echo "github.com/docker/buildx v0.21.0"; exit 0; fi\n'
        'if [ "$1 $2 $3" = "buildx imagetools inspect" ] && [ "$4" = "'
        f'{AR}:0123456789ab" ]; then\n'
        f'  echo \'{{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:{"d" * 64}", '
        '"size": 856}\'; exit 0; fi\n'
    ) if buildx else ""
    script.write_text(f"#!/bin/sh\n{answers}echo 'docker: unknown command: docker $1' >&2; exit 1\n")
    script.chmod(0o755)
    return {"PATH": str(folder), **REGISTRY_ENV}


def test_prod_pins_the_digest_the_registry_reports(tmp_path: Path) -> None:
    environ = _fake_docker(tmp_path / "bin", buildx=True)
    image = deploy_image("prod", tag="0123456789ab", root=tmp_path, environ=environ)
    assert image == ImageRef(AR, "0123456789ab", "sha256:" + "d" * 64)
    assert str(image) == f"{AR}@sha256:" + "d" * 64
    with pytest.raises(Exit, match=rf"cannot find {re.escape(AR)}:ffffffffffff in its registry .*push it first"):
        deploy_image("prod", tag="ffffffffffff", root=tmp_path, environ=environ)


def test_prod_digest_lookup_without_buildx_says_so(tmp_path: Path) -> None:
    environ = _fake_docker(tmp_path / "bin", buildx=False)
    with pytest.raises(Exit, match=r"needs docker's buildx plugin .* or pass --digest"):
        deploy_image("prod", tag="0123456789ab", root=tmp_path, environ=environ)
