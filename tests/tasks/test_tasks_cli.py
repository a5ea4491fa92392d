"""The command line as a user meets it: `invoke --list`, `invoke <task> --help`, and clear stops before anything
runs when a tool or a setting is missing."""

from __future__ import annotations

import inspect
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from invoke import Context
from invoke.exceptions import Exit
from k8s_task_objects import DEPLOYED

from k8s_tasks.cluster import current_context, kubeconfig_problem
from k8s_tasks.deploy import plan_deploy
from k8s_tasks.plan import run_plan
from k8s_tasks.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
TASKS = ("bench", "build", "cleanup", "demo", "deploy", "doctor", "generate", "logs", "merge", "prepare-storage",
         "push", "rollback", "status", "test", "train", "ui", "validate")
HEAVY = ("torch", "transformers", "llamafactory", "mlflow", "peft", "datasets")
REGISTRY_ENV = {"PROJECT_ID": "my-project", "REGION": "europe-west4", "REPOSITORY": "training"}


def invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env, check=False)


def test_list_shows_every_task_with_its_help() -> None:
    result = invoke("--list")
    assert result.returncode == 0, result.stderr
    listed = dict(re.findall(r"^  ([\w-]+)\s+(\S.*)$", result.stdout, re.MULTILINE))
    assert sorted(listed) == sorted(TASKS)
    assert all(len(text) > 20 for text in listed.values()), listed


@pytest.mark.parametrize("task", TASKS)
def test_task_help_explains_every_option(task: str) -> None:
    # `ui --help` and `cleanup --help` included: invoke would give --help to their positional argument.
    result = invoke(task, "--help")
    assert result.returncode == 0, result.stderr
    assert "Docstring:" in result.stdout
    options = result.stdout.split("Options:", 1)[1] if "Options:" in result.stdout else ""
    for line in options.splitlines():
        if line.startswith("  -"):  # an option (continuation lines are indented further)
            assert re.search(r"--\S+\s{2,}\S", line), f"option without help in `invoke {task} --help`: {line}"


def test_build_without_docker_stops_with_what_to_install(path_without: Callable[..., str]) -> None:
    env = {**os.environ, **REGISTRY_ENV, "PATH": path_without("docker")}
    result = invoke("build", "--tag=0123456789ab", env=env)
    assert result.returncode == 1
    assert "docker not found on PATH: install Docker" in result.stderr
    assert "$ docker" not in result.stdout  # nothing ran


def test_build_dry_run_works_without_docker_and_names_what_is_missing(path_without: Callable[..., str]) -> None:
    env = {**os.environ, **REGISTRY_ENV, "PATH": path_without("docker")}
    result = invoke("build", "--tag=0123456789ab", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "$ docker build --platform linux/amd64 --file docker/Dockerfile --tag " \
           "europe-west4-docker.pkg.dev/my-project/training/llama-factory-train:0123456789ab" in result.stdout
    assert "a real run would stop before its first step: docker not found on PATH" in result.stdout


def test_buildah_build_dry_run_prints_the_buildah_command(path_without: Callable[..., str]) -> None:
    env = {**os.environ, **REGISTRY_ENV, "PATH": path_without("buildah")}
    result = invoke("build", "--tag=0123456789ab", "--builder=buildah", "--torch-variant=cpu", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "$ buildah bud --isolation chroot --format docker --platform linux/amd64 --file docker/Dockerfile --tag " \
           "europe-west4-docker.pkg.dev/my-project/training/llama-factory-train:0123456789ab" in result.stdout
    assert "--build-arg TORCH_VARIANT=cpu ." in result.stdout
    assert "a real run would stop before its first step: buildah not found on PATH: install buildah" in result.stdout


def test_build_with_an_unknown_builder_stops_before_anything_runs() -> None:
    result = invoke("build", "--tag=0123456789ab", "--builder=kaniko", env={**os.environ, **REGISTRY_ENV})
    assert result.returncode == 1
    assert "--builder must be one of docker, buildah, not 'kaniko'" in result.stderr
    assert "$ " not in result.stdout


@pytest.mark.parametrize("task", [("build",), ("push",), ("deploy", "--env=dev", "--dry-run")])
def test_unset_project_id_stops_before_anything_runs(task: tuple[str, ...]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ID", "REGION", "REPOSITORY")}
    result = invoke(*task, env=env)
    assert result.returncode == 1
    assert "PROJECT_ID and REGION and REPOSITORY are not set: the image lives in Artifact Registry" in result.stderr
    assert "$ " not in result.stdout


def test_deploy_needs_an_env() -> None:
    result = invoke("deploy", env={**os.environ, **REGISTRY_ENV})
    assert result.returncode == 1
    assert "--env must be one of dev, gpu, prod" in result.stderr


def test_deploy_without_kubectl_or_kube_context_runs_nothing(tree: Path, environ: dict[str, str],
                                                             path_without: Callable[..., str]) -> None:
    ran: list[list[str]] = []

    def runner(argv: list[str], stdin: str | None, cwd: Path) -> int:
        ran.append(argv)
        return 0

    plan = plan_deploy("dev", "all", DEPLOYED["dev"], root=tree, environ=environ)
    no_kubectl = {**environ, "PATH": path_without("kubectl")}
    with pytest.raises(Exit) as raised:
        run_plan(plan, dry_run=False, root=tree, runner=runner, out=io.StringIO(), environ=no_kubectl,
                 tools_root=tree)  # and not in this checkout's .tools/bin either
    assert raised.value.message.startswith("kubectl not found on PATH: install kubectl")
    assert "scripts/ensure-tools.sh" in raised.value.message
    no_context = {**environ, "KUBECONFIG": str(tree / "missing-kubeconfig")}
    with pytest.raises(Exit, match="no Kubernetes context: .*gcloud container clusters get-credentials"):
        run_plan(plan, dry_run=False, root=tree, runner=runner, out=io.StringIO(), environ=no_context)
    assert ran == []
    assert not (tree / "build").exists()


def test_gke_auth_plugin_missing_is_named(tree: Path, environ: dict[str, str],
                                          path_without: Callable[..., str]) -> None:
    kubeconfig = Path(environ["KUBECONFIG"])
    kubeconfig.write_text(kubeconfig.read_text().replace(
        "token: not-a-real-token", "exec: {apiVersion: client.authentication.k8s.io/v1beta1, "
        "command: gke-gcloud-auth-plugin}"))
    plan = plan_deploy("dev", "all", DEPLOYED["dev"], root=tree, environ=environ)
    problems = plan.problems(tree, {**environ, "PATH": path_without("gke-gcloud-auth-plugin")}, tools_root=tree)
    assert problems == ["kube context gke_my-project_europe-west4_training logs in with gke-gcloud-auth-plugin "
                        "not found on PATH: your kubeconfig authenticates through it: "
                        "`gcloud components install gke-gcloud-auth-plugin`"]


def test_several_kubeconfig_files_name_the_cluster_kubectl_uses(tree: Path, environ: dict[str, str],
                                                                path_without: Callable[..., str]) -> None:
    # gcloud writes a cluster's entries into one file; the current context may be set in another, and a later
    # file may set one too: kubectl keeps the first, and so must the tasks (their kubectl commands use it).
    first = tree / "kubeconfig-current"
    first.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "gke_p_r_training"}))
    second = tree / "kubeconfig-gke"
    second.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kind-local",
        "contexts": [{"name": "gke_p_r_training", "context": {"cluster": "training", "user": "gke"}},
                     {"name": "kind-local", "context": {"cluster": "training", "user": "gke"}}],
        "clusters": [{"name": "training", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "gke", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                                                    "command": "gke-gcloud-auth-plugin"}}}],
    }))
    both = {**environ, "KUBECONFIG": os.pathsep.join([str(first), str(second)])}
    kubectl = subprocess.run([require_tool("kubectl"), "config", "current-context"], env=both, capture_output=True,
                             text=True, timeout=60, check=True)
    assert current_context(both) == kubectl.stdout.strip() == "gke_p_r_training"
    assert kubeconfig_problem(tree, {**both, "PATH": path_without("gke-gcloud-auth-plugin")}) == (
        "kube context gke_p_r_training logs in with gke-gcloud-auth-plugin not found on PATH: your kubeconfig "
        "authenticates through it: `gcloud components install gke-gcloud-auth-plugin`")
    problem = kubeconfig_problem(tree, {**both, "KUBECONFIG": str(first)})  # a context no file defines
    assert problem.startswith(f"cannot load the kubeconfig ({first}): ")
    assert "Expected object with name gke_p_r_training" in problem


def test_the_install_provides_the_task_library(tmp_path: Path) -> None:
    # `pip install -e .` (./dev.sh setup) or a wheel: k8s_tasks is importable outside the checkout too.
    code = "import k8s_tasks.actions, entrypoint.errors; print(k8s_tasks.__name__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "k8s_tasks"


def test_the_task_side_imports_nothing_heavy() -> None:
    code = ("import sys, tasks, k8s_tasks.actions; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("task", TASKS)
def test_each_task_passes_arguments_its_action_takes(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A renamed or missing keyword would fail only when a user runs the task: call each with its defaults.
    import tasks
    from k8s_tasks import actions

    bound: list[inspect.BoundArguments] = []
    for name, function in vars(actions).items():
        if inspect.isfunction(function) and function.__module__ == actions.__name__:
            monkeypatch.setattr(actions, name, lambda *a, _f=function, **k: bound.append(
                inspect.signature(_f).bind(*a, **k)))
    body = getattr(tasks, task.replace("-", "_")).body
    required = [p for p in list(inspect.signature(body).parameters.values())[1:] if p.default is p.empty]
    body(Context(), *["jobs" for _ in required])
    assert len(bound) == 1
