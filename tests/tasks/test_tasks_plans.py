"""The exact commands each mutating task runs, for every overlay: what --dry-run prints and a real run executes."""

from __future__ import annotations

import io
import re
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from invoke.exceptions import Exit
from k8s_fake_cluster import FakeCluster
from k8s_task_objects import DEPLOYED, REGISTRY, deployed, job

from k8s_tasks.cleanup import plan_cleanup
from k8s_tasks.deploy import plan_deploy
from k8s_tasks.image import PLACEHOLDER, ImageRef, build_plan, push_plan
from k8s_tasks.jobs import plan_start
from k8s_tasks.local import plan_bench, plan_demo, plan_test
from k8s_tasks.overlays import ENVS
from k8s_tasks.plan import run_plan
from k8s_tasks.ui import plan_ui

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
ALL = "app.kubernetes.io/component notin (train,merge)"
ROLLOUT = ["kubectl", "rollout", "status", "deployment/llama-webui", "-n", "llm-training", "--timeout=15m"]


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize(
    ("component", "selector", "waits"),
    [
        ("all", ALL, True),
        ("base", "app.kubernetes.io/component notin (train,merge,webui)", False),
        ("webui", "app.kubernetes.io/component=webui", True),
    ],
)
def test_deploy_applies_the_overlay_with_the_image_set_in_one_generated_file(
    env: str, component: str, selector: str, waits: bool, tree: Path, environ: dict[str, str]
) -> None:
    image = DEPLOYED[env]
    plan = plan_deploy(env, component, image, root=tree, environ=environ)
    assert plan.commands() == [["kubectl", "apply", "-k", f"build/deploy/{env}", "-l", selector],
                               *([ROLLOUT] if waits else [])]
    (wrapper,) = [s for s in plan.steps if not hasattr(s, "argv")]
    assert wrapper.path == Path(f"build/deploy/{env}/kustomization.yaml")
    kustomization = yaml.safe_load(wrapper.content)
    assert kustomization["resources"] == [f"../../../overlays/{env}"]
    expected = {"name": PLACEHOLDER, "newName": REGISTRY}
    expected.update({"digest": image.digest} if env == "prod" else {"newTag": image.tag})
    assert kustomization["images"] == [expected]
    assert "gke_my-project_europe-west4_training" in plan.title


@pytest.mark.parametrize("env", ENVS)
def test_deploy_dry_run_prints_the_commands_and_changes_nothing(env: str, tree: Path,
                                                                environ: dict[str, str]) -> None:
    out = io.StringIO()
    run_plan(plan_deploy(env, "all", DEPLOYED[env], root=tree, environ=environ), dry_run=True, root=tree,
             out=out, environ=environ)
    text = out.getvalue()
    assert f"$ kubectl apply -k build/deploy/{env} -l 'app.kubernetes.io/component notin (train,merge)'" in text
    assert f"write build/deploy/{env}/kustomization.yaml" in text
    assert not (tree / "build").exists()


@pytest.mark.parametrize("env", ENVS)
def test_a_real_deploy_writes_the_wrapper_then_runs_kubectl(env: str, tree: Path, environ: dict[str, str]) -> None:
    ran: list[tuple[list[str], Path]] = []

    def runner(argv: list[str], stdin: str | None, cwd: Path) -> int:
        # The wrapper exists when kubectl runs, so `apply -k` finds it.
        assert (cwd / f"build/deploy/{env}/kustomization.yaml").is_file()
        ran.append((argv, cwd))
        return 0

    run_plan(plan_deploy(env, "base", DEPLOYED[env], root=tree, environ=environ), dry_run=False, root=tree,
             runner=runner, out=io.StringIO(), environ=environ)
    assert [argv[1:] for argv, _ in ran] == [
        ["apply", "-k", f"build/deploy/{env}", "-l", "app.kubernetes.io/component notin (train,merge,webui)"]]
    assert ran[0][1] == tree


def test_prod_deploy_needs_a_digest(tree: Path, environ: dict[str, str]) -> None:
    with pytest.raises(Exit, match="digest"):
        plan_deploy("prod", "all", ImageRef(REGISTRY, tag="0123456789ab"), root=tree, environ=environ)


def test_build_and_push_commands() -> None:
    ref = ImageRef(REGISTRY, tag="0123456789ab")
    assert build_plan(ref, "f" * 40).commands() == [[
        "docker", "build", "--platform", "linux/amd64", "--file", "docker/Dockerfile",
        "--tag", f"{REGISTRY}:0123456789ab",
        "--label", f"org.opencontainers.image.revision={'f' * 40}",
        "--label", "org.opencontainers.image.version=0123456789ab", ".",
    ]]
    assert push_plan(ref).commands() == [
        ["docker", "push", f"{REGISTRY}:0123456789ab"],
        ["docker", "image", "inspect", "--format", '{{join .RepoDigests "\\n"}}', f"{REGISTRY}:0123456789ab"],
    ]


def test_buildah_builds_the_same_dockerfile_with_the_chosen_base_and_torch() -> None:
    ref = ImageRef(REGISTRY, tag="0123456789ab")
    plan = build_plan(ref, "f" * 40, builder="buildah", base_image="localhost/debian-python:12",
                      torch_variant="cpu")
    assert plan.commands() == [[
        "buildah", "bud", "--isolation", "chroot", "--format", "docker",
        "--platform", "linux/amd64", "--file", "docker/Dockerfile",
        "--tag", f"{REGISTRY}:0123456789ab",
        "--label", f"org.opencontainers.image.revision={'f' * 40}",
        "--label", "org.opencontainers.image.version=0123456789ab",
        "--build-arg", "BASE_IMAGE=localhost/debian-python:12", "--build-arg", "TORCH_VARIANT=cpu", ".",
    ]]
    assert f"`buildah push {REGISTRY}:0123456789ab` pushes it" in "\n".join(plan.notes)
    assert any("CPUs only" in note for note in plan.notes)
    docker = build_plan(ref, "f" * 40, torch_variant="cu126").commands()[0]
    assert docker[:2] == ["docker", "build"]
    assert docker[-3:] == ["--build-arg", "TORCH_VARIANT=cu126", "."]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"builder": "podman"}, "--builder must be one of docker, buildah, not 'podman'"),
        ({"torch_variant": "cuda12"}, "--torch-variant 'cuda12' is not a PyTorch wheel variant: cpu, or cu"),
        ({"torch_variant": ""}, "is not a PyTorch wheel variant"),
        ({"base_image": "python 3.11"}, "--base-image 'python 3.11' is not an image reference"),
        ({"base_image": ""}, "is not an image reference"),
    ],
)
def test_build_options_that_cannot_work_say_what_is_allowed(option: dict[str, str], message: str) -> None:
    with pytest.raises(Exit) as raised:
        build_plan(ImageRef(REGISTRY, tag="0123456789ab"), "f" * 40, **option)
    assert message in raised.value.message


def test_a_dirty_build_says_prod_refuses_it() -> None:
    plan = build_plan(ImageRef(REGISTRY, tag="0123456789ab-dirty"), "f" * 40)
    assert any("prod" in note for note in plan.notes)


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("component", ["train", "merge"])
def test_train_and_merge_create_a_uniquely_named_copy_of_the_deployed_template(
    env: str, component: str, started: dict
) -> None:
    plan, name, cluster = started[env, component]
    assert name == f"llama-{component}-20260102-030405"
    assert plan.commands() == [["kubectl", "create", "-f", "-"]]
    created = yaml.safe_load(plan.steps[0].stdin)
    assert created["kind"] == "Job"
    assert created["metadata"]["name"] == name
    assert created["metadata"]["namespace"] == "llm-training"
    assert created["metadata"]["labels"]["app.kubernetes.io/component"] == component
    assert "selector" not in created["spec"]
    pod_spec = created["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert container["image"] == str(DEPLOYED[env])
    # A copy of the Job the overlay renders with that image (named after its spec, docs/adr/009) ...
    template = created["metadata"]["annotations"]["llama-factory/template"]
    assert re.fullmatch(rf"llama-{component}-[a-z0-9]{{10}}", template)
    # ... reading the ConfigMaps deploy applied: the identity (configuration and image) and the configuration.
    image_ref = next(e for e in container["env"] if e["name"] == "IMAGE")["valueFrom"]["configMapKeyRef"]
    assert image_ref["name"].startswith(f"llama-{component}-identity-")
    assert cluster.config_map(image_ref["name"]).data["IMAGE"] == str(DEPLOYED[env])
    assert cluster.exists("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])


def test_train_takes_the_name_given(tree: Path) -> None:
    plan, name = plan_start("dev", "train", FakeCluster(deployed("dev", tree)), now=NOW, name="lr-sweep-3",
                            root=tree)
    assert name == "lr-sweep-3"
    assert yaml.safe_load(plan.steps[0].stdin)["metadata"]["name"] == "lr-sweep-3"


def test_cleanup_deletes_finished_jobs_and_keeps_running_ones() -> None:
    cluster = FakeCluster([
        job("llama-train-20260101-000000", complete=True),
        job("llama-train-20260101-010000", failed="BackoffLimitExceeded"),
        job("llama-merge-20260101-020000", "merge", complete=True),
        job("llama-train-20260102-000000"),
    ])
    plan = plan_cleanup("jobs", cluster)
    assert plan.commands() == [["kubectl", "delete", "job", "-n", "llm-training", "llama-merge-20260101-020000",
                                "llama-train-20260101-000000", "llama-train-20260101-010000"]]
    assert any("llama-train-20260102-000000" in note for note in plan.notes)
    everything = plan_cleanup("jobs", cluster, everything=True)
    assert everything.commands()[0][-4:] == ["llama-merge-20260101-020000", "llama-train-20260101-000000",
                                             "llama-train-20260101-010000", "llama-train-20260102-000000"]


def test_cleanup_with_nothing_finished_runs_nothing() -> None:
    assert plan_cleanup("jobs", FakeCluster([job("llama-train-20260102-000000")])).commands() == []


@pytest.mark.parametrize("env", ENVS)
def test_ui_port_forwards(env: str, tree: Path) -> None:
    assert plan_ui("webui").commands() == [
        ["kubectl", "port-forward", "-n", "llm-training", "svc/llama-webui", "7860:7860"]]
    # The examples name an in-cluster server (dev, gpu) or an external one (prod): nothing to forward then.
    mlflow = plan_ui("mlflow", env=env, root=tree)
    if env == "prod":
        assert mlflow.commands() == []
        assert "https://mlflow.prod.example.internal" in mlflow.title
    else:
        assert mlflow.commands() == [["kubectl", "port-forward", "-n", "mlflow", "svc/mlflow", "5000:5000"]]


@pytest.mark.parametrize("env", ENVS)
def test_ui_webui_says_how_to_start_a_webui_scaled_to_zero(env: str, tree: Path) -> None:
    """prod and multinode deploy LLaMA Board with 0 replicas (it would take a training GPU otherwise)."""
    cluster = FakeCluster(deployed(env, tree))
    webui = next(d for d in deployed(env, tree) if d["kind"] == "Deployment")
    if webui["spec"]["replicas"] == 0:
        with pytest.raises(Exit) as raised:
            plan_ui("webui", cluster=cluster)
        assert "LLaMA Board is not running" in raised.value.message
        assert "`kubectl scale deployment/llama-webui -n llm-training --replicas=1`" in raised.value.message
    else:
        assert plan_ui("webui", cluster=cluster).commands() == [
            ["kubectl", "port-forward", "-n", "llm-training", "svc/llama-webui", "7860:7860"]]
    with pytest.raises(Exit, match="LLaMA Board is not deployed in namespace llm-training: `invoke deploy"):
        plan_ui("webui", cluster=FakeCluster([]))


def test_ui_mlflow_finds_the_only_env_file(tree: Path) -> None:
    with pytest.raises(Exit, match=r"ui mlflow needs --env: .*\(found for dev, gpu, prod, multinode\)"):
        plan_ui("mlflow", root=tree)
    (tree / "overlays/prod/mlflow.env").unlink()
    (tree / "overlays/gpu/mlflow.env").unlink()
    (tree / "overlays/multinode/mlflow.env").unlink()
    assert plan_ui("mlflow", root=tree).commands() == [
        ["kubectl", "port-forward", "-n", "mlflow", "svc/mlflow", "5000:5000"]]


def test_local_tasks_go_through_dev_sh(tree: Path) -> None:
    assert plan_test("-k deploy -x").commands() == [["./dev.sh", "test", "-k", "deploy", "-x"]]
    assert plan_demo().commands() == [["./dev.sh", "demo"]]
    assert plan_demo("/tmp/s").commands() == [["./dev.sh", "demo", "--storage", "/tmp/s"]]
    for name in ("train_bench.py", "merge_bench.py"):
        (tree / "benchmarks" / name).write_text("")
    assert plan_bench(tree).commands() == [["./dev.sh", "setup"], [".venv/bin/python", "benchmarks/merge_bench.py"],
                                           [".venv/bin/python", "benchmarks/train_bench.py"]]


def test_bench_without_benchmarks_says_so(tree: Path) -> None:
    with pytest.raises(Exit, match="no benchmarks"):
        plan_bench(tree)


def test_written_files_get_their_mode_from_the_start(tree: Path, environ: dict[str, str]) -> None:
    secret = tree / "mine.env"
    secret.write_text("MLFLOW_TRACKING_URI=https://user:s3cret@mlflow.example.com\n")
    (tree / "overlays/dev/mlflow.env").unlink()
    plan = plan_deploy("dev", "base", DEPLOYED["dev"], mlflow_env=secret, root=tree, environ=environ)
    run_plan(plan, dry_run=False, root=tree, runner=lambda *_: 0, out=io.StringIO(), environ=environ)
    written = tree / "overlays/dev/mlflow.env"
    assert written.read_text() == secret.read_text()
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
