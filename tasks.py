"""llamafactory-k8s from your laptop: build and push the image, deploy an overlay, start and follow Jobs.

`invoke --list` lists the tasks, `invoke <task> --help` explains one. Every task that changes something
takes --dry-run and then prints the exact commands it would run. The logic lives in k8s_tasks/.
"""

from invoke import Context, task

from k8s_tasks import actions
from k8s_tasks.image import DEFAULT_BASE_IMAGE, DEFAULT_TORCH_VARIANT

ENV_HELP = "overlay to use: dev, gpu, prod or multinode (overlays/<env>)"
DRY_RUN_HELP = "print the exact commands (and files) it would run or write, and change nothing"


@task(help={
    "tag": "image tag (default: the commit, <shortsha> or <shortsha>-dirty)",
    "builder": "docker (default), or buildah where there is no Docker daemon (`buildah bud --isolation chroot`)",
    "base-image": f"Debian 12 image with Python 3.11 to build on (default: {DEFAULT_BASE_IMAGE})",
    "torch-variant": f"torch build: {DEFAULT_TORCH_VARIANT} (default; GKE's GPU drivers), another cuXYZ, "
                     "or cpu (no GPU)",
    "dry-run": DRY_RUN_HELP,
})
def build(c: Context, tag: str | None = None, builder: str = "docker", base_image: str | None = None,
          torch_variant: str | None = None, dry_run: bool = False) -> None:
    """Build the image (docker/Dockerfile) as <registry>/llama-factory-train:<shortsha>[-dirty]."""
    actions.build(tag=tag, dry_run=dry_run, builder=builder, base_image=base_image, torch_variant=torch_variant)


@task(help={
    "tag": "image tag to push (default: the commit, as `build` tags it)",
    "dry-run": DRY_RUN_HELP,
})
def push(c: Context, tag: str | None = None, dry_run: bool = False) -> None:
    """Push the built image to Artifact Registry (PROJECT_ID, REGION, REPOSITORY) and print its digest."""
    actions.push(tag=tag, dry_run=dry_run)


@task(help={
    "env": ENV_HELP,
    "component": "all (everything but the Jobs), base (namespace, Secret, storage, config) or webui",
    "tag": "image tag to deploy (default: the commit's); never `latest`",
    "digest": "image digest (sha256:...) to pin; prod looks it up from the registry when not given",
    "mlflow-env": "create overlays/<env>/mlflow.env (the MLflow Secret) from this file when it is missing",
    "wait": "wait until the WebUI is ready (default; --no-wait returns after applying)",
    "dry-run": DRY_RUN_HELP,
})
def deploy(c: Context, env: str | None = None, component: str = "all", tag: str | None = None,
           digest: str | None = None, mlflow_env: str | None = None, wait: bool = True,
           dry_run: bool = False) -> None:
    """Apply an overlay with the built image (config, Secret, storage, WebUI); Jobs start with `train`/`merge`."""
    actions.deploy(env=env, component=component, tag=tag, digest=digest, mlflow_env=mlflow_env, wait=wait,
                   dry_run=dry_run)


JOB_HELP = {
    "env": ENV_HELP,
    "name": "Job name (default: llama-<train|merge>-<YYYYmmdd-HHMMSS>, UTC)",
    "tag": "run the image with this tag or digest (default: the one deployed with this configuration)",
    "follow": "stream the logs, then print the result and the MLflow run",
    "dry-run": DRY_RUN_HELP + " (it still reads the cluster to find what is deployed)",
}


@task(help=JOB_HELP)
def train(c: Context, env: str | None = None, name: str | None = None, tag: str | None = None,
          follow: bool = False, dry_run: bool = False) -> None:
    """Start a training Job under a unique name from the overlay's template (needs a deploy first)."""
    actions.start("train", env=env, name=name, tag=tag, follow=follow, dry_run=dry_run)


@task(help=JOB_HELP)
def merge(c: Context, env: str | None = None, name: str | None = None, tag: str | None = None,
          follow: bool = False, dry_run: bool = False) -> None:
    """Start a merge Job (adapter into the base model, published for vLLM) under a unique name."""
    actions.start("merge", env=env, name=name, tag=tag, follow=follow, dry_run=dry_run)


@task(help={
    "env": ENV_HELP,
    "probe": "start the probe pod (default; --no-probe checks only what the API shows, and creates nothing)",
    "probe-timeout": "seconds to wait for the probe pod, image pull and a node scale-up included (default 600)",
})
def doctor(c: Context, env: str | None = None, probe: bool = True, probe_timeout: int = 600) -> None:
    """Check the current kube context against the overlay: one line per check (✓/✗/?), a fix for each ✗."""
    actions.doctor(env=env, probe=probe, probe_timeout=probe_timeout)


@task(help={
    "env": ENV_HELP,
    "recursive": "also hand over everything already inside those directories (files written as root before)",
    "dry-run": DRY_RUN_HELP,
})
def prepare_storage(c: Context, env: str | None = None, recursive: bool = False, dry_run: bool = False) -> None:
    """One-time admin step: a root Job makes the storage's directories writable by the pods' UID 10001."""
    actions.prepare_storage(env=env, recursive=recursive, dry_run=dry_run)


@task(help={**JOB_HELP, "name": "Job name (default: llama-rollback-<YYYYmmdd-HHMMSS>, UTC)",
             "to": "the published version to serve, e.g. v0002 (default: the newest older than the served one; "
                   "give it, so a retried Job does not roll back twice)"})
def rollback(c: Context, env: str | None = None, to: str | None = None, name: str | None = None,
             tag: str | None = None, follow: bool = False, dry_run: bool = False) -> None:
    """Serve an earlier merged version again: a Job (the merge Job's template) runs `python -m entrypoint
    rollback`, which switches MERGED_MODEL_PATH atomically and moves the registry alias champion."""
    actions.rollback(env=env, to=to, name=name, tag=tag, follow=follow, dry_run=dry_run)


@task
def status(c: Context) -> None:
    """Show Jobs (with training progress and ETA, or why Kueue holds them), pods, the WebUI and the last failure's
    reason."""
    actions.status()


@task(help={
    "job": "Job whose newest pod to show (default: the newest Job of --component)",
    "component": "train, merge or webui (default: train)",
    "follow": "keep streaming until the container ends",
    "tail": "show only the last N lines (default: all)",
})
def logs(c: Context, job: str | None = None, component: str = "train", follow: bool = False, tail: int = 0) -> None:
    """Print the log of the newest training (or merge, or WebUI) pod."""
    actions.logs(job=job, component=component, follow=follow, tail=tail)


@task(help={
    "target": "webui (LLaMA Board, localhost:7860) or mlflow (localhost:5000)",
    "env": "for mlflow: the overlay whose mlflow.env names the server (default: the only one there is)",
    "port": "local port (default: 7860 for webui, 5000 for mlflow)",
    "dry-run": DRY_RUN_HELP,
})
def ui(c: Context, target: str, env: str | None = None, port: int = 0, dry_run: bool = False) -> None:
    """Port-forward to the WebUI or to MLflow (Ctrl-C stops)."""
    actions.ui(target, env=env, port=port, dry_run=dry_run)


@task(help={
    "target": "what to clean up: jobs",
    "all": "delete running Jobs too (training stops at a checkpoint; a later run resumes)",
    "dry-run": DRY_RUN_HELP,
})
def cleanup(c: Context, target: str, all_: bool = False, dry_run: bool = False) -> None:
    """Delete finished Jobs (Complete or Failed) and their pods; --all deletes every Job."""
    actions.cleanup(target, everything=all_, dry_run=dry_run)


@task(help={
    "env": "check only this overlay as `kubectl apply -k overlays/<env>` applies it: fails on a placeholder image",
})
def validate(c: Context, env: str | None = None) -> None:
    """Render every overlay offline, alone and with components/spot, kueue and flex-start; check the renders with
    kubernetes-validate and checkov (and lint the Dockerfile)."""
    actions.validate(env=env)


@task(help={
    "check": "change nothing: show the diff of each stale file and fail, naming them (what the tests check)",
    "dry-run": "change nothing: show the diff of each stale file",
})
def generate(c: Context, check: bool = False, dry_run: bool = False) -> None:
    """Rewrite every generated file from its source: base/llm-config.env, README tables, expected renders."""
    actions.generate(check=check, dry_run=dry_run)


@task(help={"pytest-args": "arguments for pytest, e.g. \"-k deploy -x\"", "dry-run": DRY_RUN_HELP})
def test(c: Context, pytest_args: str = "", dry_run: bool = False) -> None:
    """Run the test suite as CI does (./dev.sh test)."""
    actions.test(pytest_args=pytest_args, dry_run=dry_run)


@task(help={"storage": "local folder laid out like /storage (default: ./local-storage)", "dry-run": DRY_RUN_HELP})
def demo(c: Context, storage: str | None = None, dry_run: bool = False) -> None:
    """Run the whole flow locally on a generated tiny model (./dev.sh demo): no GPU, no cluster."""
    actions.demo(storage=storage, dry_run=dry_run)


@task(help={"dry-run": DRY_RUN_HELP})
def bench(c: Context, dry_run: bool = False) -> None:
    """Run every benchmarks/*.py with the project's venv (.venv, set up by ./dev.sh)."""
    actions.bench(dry_run=dry_run)
