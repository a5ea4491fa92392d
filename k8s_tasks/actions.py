"""One function per task of tasks.py: gather the inputs, plan, then print the plan (--dry-run) or run it."""

from __future__ import annotations

import importlib.util
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from invoke.exceptions import Exit

from k8s_tasks import cleanup as cleanup_plans
from k8s_tasks import local
from k8s_tasks import logs as pod_logs
from k8s_tasks import ui as port_forward
from k8s_tasks.cluster import KubeCluster
from k8s_tasks.deploy import deploy_image, plan_deploy
from k8s_tasks.doctor import run_doctor
from k8s_tasks.follow import follow_job
from k8s_tasks.generate import generate as generate_files
from k8s_tasks.image import ImageRef, build_plan, git_state, push_plan, repository, validate_tag
from k8s_tasks.jobs import plan_rollback, plan_start
from k8s_tasks.overlays import check_env
from k8s_tasks.plan import run_plan
from k8s_tasks.status import render_status
from k8s_tasks.storage_owner import plan_prepare_storage
from k8s_tasks.tools import require_tool
from k8s_tasks.validate import validate as validate_overlays

# The doctor's probe pod must at least pull the image (~5 GB) and start.
MIN_PROBE_TIMEOUT = 60


def help_if_asked(task: str, positional: str) -> None:
    """Show the task's help when `--help` arrived as its positional argument.

    Invoke's parser gives a missing positional argument the next token, even `--help` (`invoke ui --help`
    would run `ui` with target "--help"); this shows the help `invoke --help ui` shows, and exits.
    """
    if positional in ("-h", "--help"):
        from invoke import Collection, Program

        # A fresh copy of tasks.py: building a parser consumes the tasks' help texts (Task.arg_opts pops them).
        spec = importlib.util.spec_from_file_location("tasks_help", sys.modules["tasks"].__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        Program(namespace=Collection.from_module(module), binary="invoke").run(["invoke", "--help", task])


def _image(tag: str | None) -> tuple[ImageRef, str]:
    """The image to build or push, and the commit it comes from."""
    repo = repository()
    state = git_state()
    return ImageRef(repo, validate_tag(tag) if tag else state.tag), state.revision


def build(*, tag: str | None, dry_run: bool, builder: str = "docker", base_image: str | None = None,
          torch_variant: str | None = None) -> None:
    ref, revision = _image(tag)
    run_plan(build_plan(ref, revision, builder, base_image, torch_variant), dry_run=dry_run)


def push(*, tag: str | None, dry_run: bool) -> None:
    ref, _ = _image(tag)
    run_plan(push_plan(ref), dry_run=dry_run)


def deploy(*, env: str | None, component: str, tag: str | None, digest: str | None, mlflow_env: str | None,
           wait: bool, dry_run: bool) -> None:
    env = check_env(env)
    image = deploy_image(env, tag=tag, digest=digest)
    plan = plan_deploy(env, component, image, mlflow_env=Path(mlflow_env) if mlflow_env else None, wait=wait)
    run_plan(plan, dry_run=dry_run)


def start(component: str, *, env: str | None, name: str | None, tag: str | None, follow: bool,
          dry_run: bool) -> None:
    env = check_env(env)
    require_tool("kubectl")
    cluster = KubeCluster()
    plan, job = plan_start(env, component, cluster, now=datetime.now(UTC), name=name, tag=tag,
                           region=os.environ.get("REGION"))
    run_plan(plan, dry_run=dry_run, show_stdin=dry_run)
    if dry_run:
        return
    if not follow:
        print(f"started Job {job}: `invoke logs --job={job} --follow`, `invoke status`")
        return
    try:
        completed = follow_job(cluster, job, env, sys.stdout)
    except KeyboardInterrupt:
        raise Exit(f"stopped following; Job {job} keeps running (`invoke status`, "
                   f"`invoke logs --job={job} --follow`)", code=130) from None
    if not completed:
        raise Exit(f"Job {job} failed", code=1)


def doctor(*, env: str | None, probe: bool, probe_timeout: int) -> None:
    env = check_env(env)
    if probe_timeout < MIN_PROBE_TIMEOUT:
        raise Exit(f"--probe-timeout must be at least {MIN_PROBE_TIMEOUT} seconds (pulling the image alone takes "
                   f"minutes), not {probe_timeout}")
    require_tool("kubectl")  # the overlay is rendered to know what its pods need
    try:
        checks = run_doctor(env, connect=KubeCluster, out=sys.stdout, probe=probe, timeout=probe_timeout)
    except KeyboardInterrupt:
        raise Exit("doctor interrupted; its probe pod was deleted", code=130) from None
    if any(check.status == "fail" for check in checks):
        raise Exit(code=1)


def prepare_storage(*, env: str | None, recursive: bool, dry_run: bool) -> None:
    env = check_env(env)
    require_tool("kubectl")
    run_plan(plan_prepare_storage(env, KubeCluster(), recursive=recursive), dry_run=dry_run)


def rollback(*, env: str | None, to: str | None, name: str | None, tag: str | None, follow: bool,
             dry_run: bool) -> None:
    env = check_env(env)
    require_tool("kubectl")
    cluster = KubeCluster()
    plan, job = plan_rollback(env, cluster, now=datetime.now(UTC), to=to, name=name, tag=tag)
    run_plan(plan, dry_run=dry_run, show_stdin=dry_run)
    if dry_run:
        return
    if not follow:
        print(f"started Job {job}: `invoke logs --job={job} --follow`, `invoke status`")
        return
    try:
        completed = follow_job(cluster, job, env, sys.stdout)
    except KeyboardInterrupt:
        raise Exit(f"stopped following; Job {job} keeps running (`invoke status`)", code=130) from None
    if not completed:
        raise Exit(f"Job {job} failed", code=1)


def status() -> None:
    print(render_status(KubeCluster(), datetime.now(UTC)))


def logs(*, job: str | None, component: str, follow: bool, tail: int) -> None:
    cluster = KubeCluster()
    pod = pod_logs.pick_pod(cluster, job, component)
    try:
        pod_logs.print_logs(cluster, pod, sys.stdout, follow=follow, tail=tail or None)
    except KeyboardInterrupt:
        raise Exit("", code=130) from None


def ui(target: str, *, env: str | None, port: int, dry_run: bool) -> None:
    help_if_asked("ui", target)
    cluster = KubeCluster() if target == "webui" else None  # the WebUI may be scaled to 0: say how to start it
    run_plan(port_forward.plan_ui(target, env=check_env(env) if env else None, port=port or None, cluster=cluster),
             dry_run=dry_run)


def cleanup(target: str, *, everything: bool, dry_run: bool) -> None:
    help_if_asked("cleanup", target)
    run_plan(cleanup_plans.plan_cleanup(target, KubeCluster(), everything=everything), dry_run=dry_run)


def validate(*, env: str | None) -> None:
    validate_overlays(sys.stdout, env=check_env(env) if env else None)


def generate(*, check: bool, dry_run: bool) -> None:
    generate_files(sys.stdout, check=check, dry_run=dry_run)


def test(*, pytest_args: str, dry_run: bool) -> None:
    run_plan(local.plan_test(pytest_args), dry_run=dry_run)


def demo(*, storage: str | None, dry_run: bool) -> None:
    run_plan(local.plan_demo(storage), dry_run=dry_run)


def bench(*, dry_run: bool) -> None:
    run_plan(local.plan_bench(), dry_run=dry_run)
