"""components/multinode (docs/adr/006-multinode.md): the training Job as an Indexed Job of NNODES pods that find
node 0 by a stable DNS name, checked on the renders and against what the entrypoint makes of each pod's env."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from kustomize_helpers import env_of, uses_component

from entrypoint.errors import ConfigError
from entrypoint.settings import check_topology, load_settings
from k8s_tasks.overlays import ENVS, find, one, parse, render
from k8s_tasks.tools import require_tool

MULTINODE = [o for o in ENVS if uses_component(o, "multinode")]
TRAIN_LABELS = {"app.kubernetes.io/name": "llama-factory", "app.kubernetes.io/component": "train"}
GPU = "nvidia.com/gpu"
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def _job(docs: list[dict]) -> dict:
    return one(docs, "Job", "train")


def _named(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _config(docs: list[dict]) -> dict[str, str]:
    return next(d for d in docs if d["metadata"]["name"].startswith("llm-config-"))["data"]


def pod_env(docs: list[dict], index: int) -> dict[str, str]:
    """The environment pod <index> of the training Job gets: envFrom, then env with the downward API resolved as
    the kubelet does (the Job controller names the pod <job>-<index>-<suffix> and labels it with the Job's name)."""
    job = _job(docs)
    name = job["metadata"]["name"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    fields = {
        "metadata.name": f"{name}-{index}-x7k2p",
        "metadata.labels['batch.kubernetes.io/job-name']": name,
        INDEX_ANNOTATION: str(index),
    }
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(_named(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            secret = _named(docs, "Secret", source["secretRef"]["name"])["data"]
            env.update({k: base64.b64decode(v).decode() for k, v in secret.items()})
    for item in container["env"]:
        ref = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in ref:
            env[item["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        else:
            key = ref["configMapKeyRef"]
            env[item["name"]] = _named(docs, "ConfigMap", key["name"])["data"][key["key"]]
    return env


def test_the_multinode_overlay_uses_the_component() -> None:
    assert MULTINODE == ["multinode"]
    assert not uses_component("prod", "multinode"), "prod stays one node: multi-node is its own overlay"


@pytest.mark.parametrize("overlay", MULTINODE)
def test_nnodes_is_the_number_of_pods_and_all_run_at_once(overlay: str, docs: dict) -> None:
    spec = _job(docs[overlay])["spec"]
    nnodes = int(_config(docs[overlay])["NNODES"])
    assert nnodes >= 2
    assert spec["completionMode"] == "Indexed"
    # Integers, not the ConfigMap's string "2": the API server would refuse a string.
    assert type(spec["completions"]) is int and type(spec["parallelism"]) is int
    assert spec["completions"] == spec["parallelism"] == nnodes


@pytest.mark.parametrize("overlay", MULTINODE)
def test_every_pod_finds_node_zero_through_the_headless_service(overlay: str, docs: dict) -> None:
    job = _job(docs[overlay])
    pod = job["spec"]["template"]
    service = _named(docs[overlay], "Service", "llama-train-nodes")
    name = service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert "ports" not in service["spec"], "DNS only: the pods connect to each other directly"
    # Selects the training pods by labels that never change (not the Job's name, which carries a hash).
    assert service["spec"]["selector"] == TRAIN_LABELS
    assert TRAIN_LABELS.items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["subdomain"] == name
    env = env_of(pod["spec"]["containers"][0])
    assert env["MULTINODE_SERVICE"] == name
    assert env["JOB_COMPLETION_INDEX"] == {"fieldRef": {"fieldPath": INDEX_ANNOTATION}}

    # What the entrypoint makes of each pod's environment: its rank, and node 0's stable name and port.
    job_name = job["metadata"]["name"]
    nnodes = job["spec"]["completions"]
    for index in range(nnodes):
        settings = load_settings(pod_env(docs[overlay], index))
        check_topology(settings)
        assert (settings.node_rank, settings.nnodes) == (index, nnodes)
        assert settings.master_addr == f"{job_name}-0.{name}"
        assert settings.master_port == int(_config(docs[overlay])["MASTER_PORT"])
    # A pod beyond NNODES (completions out of step with NNODES) is refused before it trains.
    with pytest.raises(ConfigError, match=f"is not below NNODES={nnodes}"):
        check_topology(load_settings(pod_env(docs[overlay], nnodes)))


@pytest.mark.parametrize("overlay", MULTINODE)
def test_each_pod_is_a_whole_gpu_node_running_one_process_per_gpu(overlay: str, docs: dict) -> None:
    pod = _job(docs[overlay])["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"][GPU] == resources["limits"][GPU] == 8
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-h100-80gb"
    config = _config(docs[overlay])
    assert config["NPROC_PER_NODE"] == "auto", "one training process per GPU the pod was given"
    assert config["DEEPSPEED"] == "zero3" and config["FINETUNING_TYPE"] == "full"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("overlay", MULTINODE)
def test_a_failed_node_retries_per_index_and_config_errors_still_fail_at_once(overlay: str, docs: dict) -> None:
    spec = _job(docs[overlay])["spec"]
    single_node = _job(docs["gpu"])["spec"]
    assert spec["podFailurePolicy"] == single_node["podFailurePolicy"], "the failure rules are the one-node ones"
    assert spec["podReplacementPolicy"] == "Failed" and spec["template"]["spec"]["restartPolicy"] == "Never"
    # Every attempt costs each index one retry: per-index limits give NNODES-independent retries, and the
    # Job fails as soon as one index has none left.
    assert spec["backoffLimitPerIndex"] >= 3 and spec["maxFailedIndexes"] == 0
    assert "backoffLimit" not in spec


def _variant(tree: Path, tmp_path: Path, name: str) -> Path:
    variant = tmp_path / name
    shutil.copytree(tree, variant, ignore=shutil.ignore_patterns("render-*.yaml", "filestore-example"))
    return variant


def test_nnodes_is_set_in_one_place(manifest_tree: Path, tmp_path: Path, docs: dict) -> None:
    variant = _variant(manifest_tree, tmp_path, "four-nodes")
    kustomization = variant / "overlays" / "multinode" / "kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("NNODES=") == 1
    kustomization.write_text(text.replace("- NNODES=2\n", "- NNODES=4\n"))
    after = parse(render(variant / "overlays" / "multinode"))
    job, before = _job(after), _job(docs["multinode"])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert _config(after)["NNODES"] == "4"
    # A new Job name (its identity hash covers the config): a re-apply starts a new Job, never edits one.
    assert job["metadata"]["name"] != before["metadata"]["name"]
    changed = {k for k in job["spec"] if job["spec"][k] != before["spec"][k]}
    assert changed == {"completions", "parallelism", "template"}
    refs = [next(iter(r.values()))["name"] for r in job["spec"]["template"]["spec"]["containers"][0]["envFrom"]]
    assert refs[0] == next(d for d in after if d["metadata"]["name"].startswith("llm-config-"))["metadata"]["name"]


def test_the_component_makes_another_overlay_multinode(manifest_tree: Path, tmp_path: Path) -> None:
    """Any GPU overlay becomes multi-node by adding the component and NNODES, and nothing else."""
    variant = _variant(manifest_tree, tmp_path, "gpu-multinode")
    kustomization = variant / "overlays" / "gpu" / "kustomization.yaml"
    text = kustomization.read_text()
    text = text.replace("  - ../../components/gpu\n", "  - ../../components/gpu\n  - ../../components/multinode\n")
    wait = "      - ADAPTER_WAIT_SECONDS=86400\n"
    text = text.replace(wait, wait + "      - NNODES=3\n")
    kustomization.write_text(text)
    docs = parse(render(variant / "overlays" / "gpu"))
    job = _job(docs)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    service = _named(docs, "Service", "llama-train-nodes")
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert load_settings(pod_env(docs, 2)).master_addr == f"{job['metadata']['name']}-0.llama-train-nodes"
    assert "allow-train-nodes" in {p["metadata"]["name"] for p in find(docs, "NetworkPolicy")}


def test_the_component_without_nnodes_does_not_render(manifest_tree: Path, tmp_path: Path) -> None:
    """The base ConfigMap leaves NNODES empty (a TrainJob's PET_NNODES must show through): an overlay that adds
    the component but forgets NNODES fails at render time, not with a Job of an empty number of pods."""
    variant = _variant(manifest_tree, tmp_path, "no-nnodes")
    kustomization = variant / "overlays" / "gpu" / "kustomization.yaml"
    text = kustomization.read_text()
    kustomization.write_text(
        text.replace("  - ../../components/gpu\n", "  - ../../components/gpu\n  - ../../components/multinode\n"))
    result = subprocess.run([require_tool("kubectl"), "kustomize", str(variant / "overlays" / "gpu")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert re.search(r"cannot decode .*null.* as a !!int", result.stderr), result.stderr
