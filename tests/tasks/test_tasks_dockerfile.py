"""docker/Dockerfile: checkov-clean, installs the one pinned set CI installs, runs as the pods' non-root user,
offline, and its build context holds only what it copies."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import yaml

from k8s_tasks.image import DEFAULT_BASE_IMAGE, DEFAULT_TORCH_VARIANT
from k8s_tasks.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def pip_installs() -> list[list[str]]:
    """The arguments of every `pip install` in a RUN instruction."""
    found = []
    for instruction, args in instructions():
        if instruction == "RUN":
            for command in re.split(r"&&|;", args):
                words = shlex.split(command)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words.pop(0)  # leading VAR=value assignments
                if words[:2] == ["pip", "install"]:
                    found.append(words[2:])
    return found


def lock_names() -> set[str]:
    lines = [line for line in (REPO / "requirements.lock").read_text().splitlines() if not line.startswith("#")]
    return {re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0].lower() for line in lines if line}


def test_checkov_finds_nothing() -> None:
    checkov = require_tool("checkov")  # fails (never skips) without it: scripts/ensure-tools.sh
    result = subprocess.run([checkov, "--framework", "dockerfile", "-f", str(DOCKERFILE), "--skip-download",
                             "--output", "json"], capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(result.stdout)
    assert report["summary"]["failed"] == 0, [c["check_id"] for c in report["results"]["failed_checks"]]
    # The one skip, CKV_DOCKER_7 (FROM without a tag): checkov cannot read FROM ${BASE_IMAGE}; the default is
    # asserted below to carry a release tag.
    assert [c["check_id"] for c in report["results"]["skipped_checks"]] == ["CKV_DOCKER_7"]
    assert report["summary"]["passed"] > 50


def test_the_image_installs_exactly_the_lock_plus_the_gpu_only_packages() -> None:
    installs = pip_installs()
    torch, lock, gpu, project = installs  # in this order, and nothing else
    assert torch == ["--index-url", "$TORCH_INDEX_URL", "torch==${TORCH_VERSION}+${TORCH_VARIANT}"]
    # The torch version is read from the lock, never written twice.
    assert "sed -n 's/^torch==//p' requirements.lock" in DOCKERFILE.read_text()
    assert lock == ["-r", "requirements.lock"]
    assert "--constraint" in gpu and gpu[gpu.index("--constraint") + 1] == "requirements.lock"
    added = {arg.split("==")[0].lower() for arg in gpu if "==" in arg}
    assert added == {"bitsandbytes", "deepspeed"}
    assert added.isdisjoint(lock_names())  # additions only: nothing of the lock is installed twice
    assert project == ["--no-deps", "."]


def build_arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instructions() if i == "ARG" and "=" in a)


def test_torch_comes_from_a_cuda_12_build_by_default() -> None:
    # PyPI's torch 2.13.0 is built for CUDA 13 (driver >= 580); GKE's GPU nodes run 535/570 drivers.
    args = build_arg_defaults()
    assert re.fullmatch(r"cu12\d", args["TORCH_VARIANT"])
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"


def test_invoke_build_names_the_dockerfiles_defaults() -> None:
    # `invoke build --help` states them, and passes a build argument only when the user changes one.
    args = build_arg_defaults()
    assert args["BASE_IMAGE"] == DEFAULT_BASE_IMAGE
    assert args["TORCH_VARIANT"] == DEFAULT_TORCH_VARIANT


def test_the_image_runs_as_the_pods_user_offline_and_never_trains_by_accident() -> None:
    steps = instructions()
    froms = [args for i, args in steps if i == "FROM"]
    assert [f.split()[0] for f in froms] == ["${BASE_IMAGE}"] * 2
    assert build_arg_defaults()["BASE_IMAGE"] == "docker.io/library/python:3.11-slim-bookworm"
    job = yaml.safe_load((REPO / "base" / "job-train.yaml").read_text())
    context = job["spec"]["template"]["spec"]["securityContext"]
    users = [args for i, args in steps if i == "USER"]
    assert users[-1] == f"{context['runAsUser']}:{context['runAsGroup']}"
    assert context["runAsUser"] >= 10000
    env = {}
    for i, args in steps[[i for i, _ in steps].index("FROM", 1):]:  # the final stage
        if i == "ENV":
            env.update(dict(shlex.split(pair)[0].split("=", 1) for pair in re.findall(r"\S+=\S+", args)))
    pod_env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
               if "value" in e}
    for key in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "NUMBA_CACHE_DIR",
                "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert env[key] == pod_env[key], key
    assert env["PYTHONUNBUFFERED"] == "1"
    # Where GKE mounts the node's driver: torch finds libcuda only through it.
    assert env["LD_LIBRARY_PATH"].split(":")[0] == "/usr/local/nvidia/lib64"
    assert ("ENTRYPOINT", '["python", "-m", "entrypoint"]') in steps
    assert steps[-1] == ("CMD", '["--help"]')
    assert ("HEALTHCHECK", "NONE") in steps


def test_the_build_context_holds_only_what_the_dockerfile_copies() -> None:
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*"  # everything out, then the few things the image needs back in
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for instruction, args in instructions():
        if instruction == "COPY" and not args.startswith("--from"):
            copied |= {src.rstrip("/") for src in args.split()[:-1]}
    assert copied == included
    # k8s_tasks is part of the one installed package (pyproject.toml), pure Python and never run in a pod.
    for private in ("tests", "docs", "local-storage", "overlays", ".venv", "tasks.py", "mlflow.env"):
        assert private not in included

