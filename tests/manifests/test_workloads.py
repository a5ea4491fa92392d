"""The Jobs and the WebUI: what runs, where it is scheduled, and how failures are handled."""

from __future__ import annotations

import pytest
from kustomize_helpers import containers, env_of

from entrypoint.errors import ExitCode
from k8s_tasks.image import PLACEHOLDER, placeholder_problem
from k8s_tasks.overlays import ENVS, find, one
from k8s_tasks.validate import unpullable_images

GPU = "nvidia.com/gpu"
COMMANDS = {"train": "train", "merge": "merge", "webui": "webui"}


def _workload(docs: list[dict], component: str) -> dict:
    kind = "Deployment" if component == "webui" else "Job"
    return one(docs, kind, component)


def _pod(docs: list[dict], component: str) -> dict:
    return _workload(docs, component)["spec"]["template"]["spec"]


def _config(docs: list[dict]) -> dict:
    return next(d for d in docs if d["metadata"]["name"].startswith("llm-config-"))["data"]


@pytest.mark.parametrize("overlay", ENVS)
@pytest.mark.parametrize("component", sorted(COMMANDS))
def test_containers_run_the_entrypoint(overlay: str, component: str, docs: dict) -> None:
    pod = _pod(docs[overlay], component)
    (container,) = pod["containers"]
    assert container["name"] == component
    assert container["command"] == ["python", "-m", "entrypoint", COMMANDS[component]]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    refs = [next(iter(ref.values()))["name"] for ref in container["envFrom"]]
    assert refs[0].startswith("llm-config-") and refs[1] == "mlflow-config"
    assert container["envFrom"][1]["secretRef"]["optional"] is False
    assert env_of(container)["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize("overlay", ENVS)
def test_gpu_settings_only_on_training_and_webui(overlay: str, docs: dict) -> None:
    for component in ("train", "webui"):
        pod = _pod(docs[overlay], component)
        assert pod["nodeSelector"][GPU] == "true", component
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], component
        resources = pod["containers"][0]["resources"]
        assert int(resources["limits"][GPU]) >= 1, component
        assert resources["requests"][GPU] == resources["limits"][GPU], component
        volumes = {v["name"]: v for v in pod["volumes"]}
        shm = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(shm) == 1 and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", component

    merge = _pod(docs[overlay], "merge")
    resources = merge["containers"][0]["resources"]
    assert GPU not in resources["requests"] and GPU not in resources["limits"]
    assert GPU not in merge.get("nodeSelector", {})
    assert "cloud.google.com/gke-accelerator" not in merge.get("nodeSelector", {})
    assert all(m["mountPath"] != "/dev/shm" for m in merge["containers"][0]["volumeMounts"])


@pytest.mark.parametrize(
    ("overlay", "gpus", "accelerator"),
    [
        ("gpu", 1, None),
        ("prod", 8, "nvidia-h100-80gb"),
        ("dev", 1, "nvidia-l4"),
        ("multinode", 8, "nvidia-h100-80gb"),
    ],
)
def test_gpu_count_and_type_per_overlay(overlay: str, gpus: int, accelerator: str | None, docs: dict) -> None:
    pod = _pod(docs[overlay], "train")
    assert int(pod["containers"][0]["resources"]["limits"][GPU]) == gpus
    assert pod["nodeSelector"].get("cloud.google.com/gke-accelerator") == accelerator


@pytest.mark.parametrize("overlay", ENVS)
@pytest.mark.parametrize("component", ["train", "merge"])
def test_jobs_fail_fast_on_config_errors_and_survive_preemption(
    overlay: str, component: str, docs: dict
) -> None:
    job = _workload(docs[overlay], component)
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": component, "operator": "In",
                        "values": [int(ExitCode.CONFIG), int(ExitCode.GPU_OUT_OF_MEMORY)]},
    }
    assert rules[1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    # Retriable codes must not be caught by a FailJob rule.
    for code in (ExitCode.INTERNAL, ExitCode.TEMPORARY, ExitCode.INTERRUPTED):
        assert all(int(code) not in r.get("onExitCodes", {}).get("values", []) for r in rules)
    # A multi-node Job counts retries per index (components/multinode), any other Job for the whole Job.
    retries = spec["backoffLimitPerIndex"] if spec.get("completionMode") == "Indexed" else spec["backoffLimit"]
    assert retries >= 1
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] >= 3600, "keep finished Jobs long enough to read their logs"
    # GKE spot VMs give pods 15 s after SIGTERM: a longer grace would not hold there.
    assert 0 < pod["terminationGracePeriodSeconds"] <= 15
    env = env_of(pod["containers"][0])
    assert env["JOB_NAME"] == {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}


@pytest.mark.parametrize("overlay", ENVS)
def test_merge_waits_for_training_within_its_deadline(overlay: str, docs: dict) -> None:
    train = _workload(docs[overlay], "train")["spec"]
    merge = _workload(docs[overlay], "merge")["spec"]
    wait = int(_config(docs[overlay])["ADAPTER_WAIT_SECONDS"])
    assert wait >= train["activeDeadlineSeconds"], "the merge gives up before training may finish"
    assert merge["activeDeadlineSeconds"] >= wait + 3600, "no time left to merge after the wait"


def test_prod_runs_longer_than_gpu_and_dev(docs: dict) -> None:
    deadline = {o: _workload(docs[o], "train")["spec"]["activeDeadlineSeconds"] for o in ENVS}
    assert deadline["prod"] > deadline["gpu"] > deadline["dev"]
    assert _config(docs["dev"])["LOG_LEVEL"] == "DEBUG"


@pytest.mark.parametrize("overlay", ENVS)
def test_webui_serves_on_the_configured_port_with_probes(overlay: str, docs: dict) -> None:
    deployment = _workload(docs[overlay], "webui")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (port,) = container["ports"]
    assert port == {
        "name": "http",
        "containerPort": int(_config(docs[overlay])["WEBUI_PORT"]),
        "protocol": "TCP",
    }
    assert _config(docs[overlay])["WEBUI_WORKDIR"].startswith("/storage/")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/", "port": "http"}, probe
    # prod and multinode start it at 0 (test_sizing.py: it never takes a training GPU).
    assert deployment["spec"]["replicas"] == (0 if overlay in ("prod", "multinode") else 1)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"

    service = one(docs[overlay], "Service", "webui")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 7860, "targetPort": "http", "protocol": "TCP"}
    ]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


@pytest.mark.parametrize("overlay", ENVS)
def test_one_image_set_by_the_overlay_and_it_is_a_placeholder(overlay: str, docs: dict) -> None:
    """Every workload runs the one image the overlay's `images:` entry sets: Artifact Registry's layout with
    REGION, PROJECT and REPOSITORY still to fill in, so a shipped overlay never reaches a cluster silently."""
    images = {c["image"] for _, c in _all_containers(docs[overlay])}
    assert len(images) == 1
    (image,) = images
    assert image.startswith(f"{PLACEHOLDER}@" if overlay == "prod" else f"{PLACEHOLDER}:")
    assert "set-by-overlay" not in image and not image.endswith(":latest")
    assert "gcr.io" not in image, "Container Registry was shut down in 2025"
    assert placeholder_problem(image) is not None
    assert unpullable_images(docs[overlay]) == [placeholder_problem(image)]
def _all_containers(docs: list[dict]):
    for kind in ("Job", "Deployment"):
        for workload in find(docs, kind):
            for c in containers(workload["spec"]["template"]["spec"]):
                yield workload["metadata"]["name"], c
