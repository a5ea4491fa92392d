"""Cheaper GPUs without lost work: components/spot, components/kueue and components/flex-start, each added to any
shipped overlay with one line (overlays.COMBINATIONS), rendered by the real kustomize, and the grace periods
argued in docs/adr/013-preemptible-capacity.md.

Every combination is valid Kubernetes for the oldest and newest supported minors, passes Pod Security
"restricted" (checkov runs over them in test_checkov.py), keeps the sizes test_sizing.py checks, and renames the
Jobs it changes (docs/adr/009). What each component must do is checked on all of them.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kustomize_helpers import pod_specs
from pod_security import restricted_violations

from entrypoint.settings import load_settings
from k8s_tasks.overlays import (
    COMBINATIONS,
    ENVS,
    combination_name,
    copy_tree,
    find,
    one,
    parse,
    render,
    with_components,
)
from k8s_tasks.sizing import cpu, gib
from k8s_tasks.tools import REPO
from k8s_tasks.validate import K8S_MINORS

SPOT = "cloud.google.com/gke-spot"
FLEX_START = "cloud.google.com/gke-flex-start"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MAX_RUN = "provreq.kueue.x-k8s.io/maxRunDurationSeconds"
SEVEN_DAYS = 7 * 24 * 3600  # the longest a flex-start node lives (GKE's default and maximum)
ALL = [(env, components) for env in ENVS for components in COMBINATIONS]


def _ids(case: tuple[str, tuple[str, ...]]) -> str:
    return combination_name(*case)


def _job(docs: list[dict], component: str) -> dict:
    return one(docs, "Job", component)


def _pod(docs: list[dict], component: str) -> dict:
    kind = "Deployment" if component == "webui" else "Job"
    return one(docs, kind, component)["spec"]["template"]["spec"]


def _config(docs: list[dict]) -> dict[str, str]:
    return next(d for d in docs if d["metadata"]["name"].startswith("llm-config-"))["data"]


def _toleration(key: str) -> dict[str, str]:
    return {"key": key, "operator": "Equal", "value": "true", "effect": "NoSchedule"}


def _render_variant(tmp_path: Path, env: str, components: tuple[str, ...], edit: tuple[str, str] | None = None,
                    ) -> list[dict[str, Any]]:
    """overlays/<env> with the components added and, optionally, one text edit of its kustomization."""
    tree = copy_tree(tmp_path / "tree")
    path = tree / "overlays" / env / "kustomization.yaml"
    text = with_components(path.read_text(), components)
    if edit is not None:
        old, new = edit
        assert old in text, f"{old!r} not in overlays/{env}"
        text = text.replace(old, new, 1)
    path.write_text(text)
    return parse(render(path.parent))


# --- every combination -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_each_component_is_one_line_of_the_overlay(case: tuple[str, tuple[str, ...]]) -> None:
    env, components = case
    shipped = (REPO / "overlays" / env / "kustomization.yaml").read_text().splitlines()
    added = with_components("\n".join(shipped) + "\n", components).splitlines()
    assert len(added) == len(shipped) + len(components)
    assert [line for line in added if line not in shipped] == [f"  - ../../components/{c}" for c in components]


@pytest.mark.parametrize("minor", K8S_MINORS)
def test_every_combination_is_valid_kubernetes(minor: str, combination_renders: dict[str, str],
                                               tmp_path: Path) -> None:
    files = []
    for name, text in combination_renders.items():
        files.append(tmp_path / f"{name}.yaml")
        files[-1].write_text(text)
    assert len(files) == len(ALL)
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", minor,
                             *map(str, files)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"kubernetes-validate --strict -k {minor}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_every_combination_passes_pod_security_restricted(case: tuple[str, tuple[str, ...]],
                                                           combination_docs: dict) -> None:
    for name, spec in pod_specs(combination_docs[combination_name(*case)]):
        assert restricted_violations(spec) == [], name


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_the_components_keep_what_the_sizing_was_checked_for(case: tuple[str, tuple[str, ...]],
                                                             combination_docs: dict, docs: dict) -> None:
    """Same requests, limits, GPU type and pod count as the overlay alone: test_sizing.py's fit still holds (Spot
    and flex-start VMs of a machine type have its shape)."""
    env, _ = case
    combined = combination_docs[combination_name(*case)]
    for component in ("train", "merge", "webui"):
        alone, added = _pod(docs[env], component), _pod(combined, component)
        assert [c["resources"] for c in added["containers"]] == [c["resources"] for c in alone["containers"]]
        accelerator = "cloud.google.com/gke-accelerator"
        assert added.get("nodeSelector", {}).get(accelerator) == alone.get("nodeSelector", {}).get(accelerator)
    assert {k: _job(combined, "train")["spec"].get(k) for k in ("completions", "parallelism")} == \
        {k: _job(docs[env], "train")["spec"].get(k) for k in ("completions", "parallelism")}


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_preemptions_still_never_use_up_the_retries(case: tuple[str, tuple[str, ...]], combination_docs: dict,
                                                    docs: dict) -> None:
    env, _ = case
    for component in ("train", "merge"):
        policy = _job(combination_docs[combination_name(*case)], component)["spec"]["podFailurePolicy"]
        assert policy == _job(docs[env], component)["spec"]["podFailurePolicy"]
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in \
            policy["rules"]


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_adding_a_component_renames_exactly_the_jobs_it_changes(case: tuple[str, tuple[str, ...]],
                                                                combination_docs: dict, docs: dict) -> None:
    """docs/adr/009: a changed Job spec gives a new Job name, so `kubectl apply -k` creates it instead of being
    refused (pod templates are immutable; Kueue also refuses a new queue label on a Job that is not suspended).
    flex-start changes only the training Job; spot and kueue change both."""
    env, components = case
    combined = combination_docs[combination_name(*case)]
    for component in ("train", "merge"):
        changed = component == "train" or bool({"spot", "kueue"} & set(components))
        before, after = _job(docs[env], component)["metadata"]["name"], _job(combined, component)["metadata"]["name"]
        assert (before != after) == changed, f"{component}: {before} -> {after}"


# --- components/spot ----------------------------------------------------------------------------------------


SPOT_CASES = [case for case in ALL if "spot" in case[1]]


@pytest.mark.parametrize("case", SPOT_CASES, ids=_ids)
def test_spot_moves_only_the_jobs_to_spot_nodes(case: tuple[str, tuple[str, ...]], combination_docs: dict) -> None:
    docs = combination_docs[combination_name(*case)]
    for component in ("train", "merge"):
        pod = _pod(docs, component)
        assert pod["nodeSelector"][SPOT] == "true", component
        assert _toleration(SPOT) in pod["tolerations"], component
        # The GPU toleration is kept next to it (GKE taints GPU nodes; a replaced list would lose it).
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    webui = _pod(docs, "webui")
    assert SPOT not in webui.get("nodeSelector", {})
    assert all(t.get("key") != SPOT for t in webui.get("tolerations", []))


@pytest.mark.parametrize("case", SPOT_CASES, ids=_ids)
def test_spot_grace_is_what_spot_grants(case: tuple[str, tuple[str, ...]], combination_docs: dict) -> None:
    """GKE's extended Spot shutdown lasts 120 s, 15 of them kept for system pods: 105 s is the most a pod can get
    (on a pool without the extension the kubelet cuts it to 15 s). The merge needs no more than it had."""
    docs = combination_docs[combination_name(*case)]
    assert _pod(docs, "train")["terminationGracePeriodSeconds"] == 120 - 15
    assert _pod(docs, "merge")["terminationGracePeriodSeconds"] <= 15


def _pod_environment(docs: list[dict], component: str) -> dict[str, str]:
    """What the container's process sees of the settings: llm-config, the Secret, then the literal env entries,
    which win over both (Kubernetes' order)."""
    (container,) = _pod(docs, component)["containers"]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(next(d for d in find(docs, "ConfigMap")
                            if d["metadata"]["name"] == source["configMapRef"]["name"])["data"])
        else:
            secret = one(docs, "Secret")["data"]
            env.update({k: base64.b64decode(v).decode() for k, v in secret.items()})
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


@pytest.mark.parametrize("case", [(env, ()) for env in ENVS] + ALL, ids=_ids)
def test_each_job_counts_on_exactly_the_grace_period_its_pod_gets(case: tuple[str, tuple[str, ...]],
                                                                 combination_docs: dict, docs: dict) -> None:
    """After SIGTERM the entrypoint saves, reports and exits within TERMINATION_GRACE_SECONDS: more than the pod's
    terminationGracePeriodSeconds and the kubelet kills it mid-save; less and it skips a save it had time for."""
    rendered = combination_docs[combination_name(*case)] if case[1] else docs[case[0]]
    for component in ("train", "merge"):
        grace = _pod(rendered, component)["terminationGracePeriodSeconds"]
        assert int(_pod_environment(rendered, component)["TERMINATION_GRACE_SECONDS"]) == grace, component


@pytest.mark.parametrize("case", SPOT_CASES, ids=_ids)
def test_on_spot_training_saves_every_ten_minutes_and_a_full_run_starts_no_save_it_cannot_finish(
        case: tuple[str, tuple[str, ...]], combination_docs: dict) -> None:
    """As the entrypoint reads it: SAVE_MINUTES=10 whatever the overlay says, and CHECKPOINT_ON_SIGTERM=auto (LoRA
    and QLoRA only) even where the overlay asks for full checkpoints on SIGTERM (overlays/multinode)."""
    settings = load_settings(_pod_environment(combination_docs[combination_name(*case)], "train"))
    assert settings.save_minutes == 10
    assert settings.checkpoint_on_sigterm == "auto"


# --- components/kueue ---------------------------------------------------------------------------------------


KUEUE_CASES = [case for case in ALL if "kueue" in case[1]]


@pytest.mark.parametrize("case", KUEUE_CASES, ids=_ids)
def test_kueue_labels_both_jobs_with_the_queue_of_llm_config(case: tuple[str, tuple[str, ...]],
                                                             combination_docs: dict) -> None:
    docs = combination_docs[combination_name(*case)]
    queue = _config(docs)["KUEUE_QUEUE"]
    assert queue == "llama-factory"
    # Kueue's webhook accepts only a valid object name (a DNS-1123 subdomain) as the queue.
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", queue)
    for component in ("train", "merge"):
        job = _job(docs, component)
        assert job["metadata"]["labels"][QUEUE_LABEL] == queue
        # Kueue's webhook suspends a labelled Job when it is created; a suspend in the manifest would suspend a
        # running Job again at every `kubectl apply` (docs/adr/014).
        assert "suspend" not in job["spec"]
    # Nothing else is Kueue's to manage (it would hold the WebUI's pods back, with its pod integration on).
    labelled = [d["metadata"]["name"] for d in docs if QUEUE_LABEL in (d["metadata"].get("labels") or {})]
    assert sorted(labelled) == sorted(_job(docs, c)["metadata"]["name"] for c in ("train", "merge"))


def test_the_queue_is_set_in_one_place_and_a_new_queue_gives_new_jobs(tmp_path: Path, combination_docs: dict) -> None:
    """KUEUE_QUEUE in the overlay's llm-config literals: both Jobs move to the queue, under new names (Kueue
    refuses to move a Job that is not suspended to another queue)."""
    docs = _render_variant(tmp_path, "gpu", ("kueue",),
                           edit=("    literals:\n", "    literals:\n      - KUEUE_QUEUE=team-a\n"))
    before = combination_docs[combination_name("gpu", ("kueue",))]
    for component in ("train", "merge"):
        assert _job(docs, component)["metadata"]["labels"][QUEUE_LABEL] == "team-a"
        assert _job(docs, component)["metadata"]["name"] != _job(before, component)["metadata"]["name"]


# --- components/flex-start ----------------------------------------------------------------------------------


FLEX_CASES = [case for case in ALL if "flex-start" in case[1]]


@pytest.mark.parametrize("case", FLEX_CASES, ids=_ids)
def test_flex_start_is_for_the_training_job_and_its_nodes_live_as_long_as_it_may_run(
        case: tuple[str, tuple[str, ...]], combination_docs: dict) -> None:
    docs = combination_docs[combination_name(*case)]
    train = _job(docs, "train")
    pod = train["spec"]["template"]["spec"]
    assert pod["nodeSelector"][FLEX_START] == "true"
    assert _toleration(FLEX_START) in pod["tolerations"]
    deadline = train["spec"]["activeDeadlineSeconds"]
    assert train["metadata"]["annotations"][MAX_RUN] == str(deadline)
    assert deadline <= SEVEN_DAYS, "no flex-start node lives longer: a run could outlive its node"
    for component in ("merge", "webui"):
        assert FLEX_START not in _pod(docs, component).get("nodeSelector", {}), component
    assert MAX_RUN not in (_job(docs, "merge")["metadata"].get("annotations") or {})


def test_the_node_lifetime_follows_a_changed_deadline(tmp_path: Path) -> None:
    docs = _render_variant(tmp_path, "dev", ("flex-start",), edit=(
        "  - path: patches/job-train.deadlines.yaml\n",
        "  - path: patches/job-train.deadlines.yaml\n  - patch: |-\n      apiVersion: batch/v1\n      kind: Job\n"
        "      metadata:\n        name: llama-train\n      spec:\n        activeDeadlineSeconds: 3600\n"))
    train = _job(docs, "train")
    assert train["spec"]["activeDeadlineSeconds"] == 3600
    assert train["metadata"]["annotations"][MAX_RUN] == "3600"


def test_an_overlay_without_the_alignment_asks_for_the_longest_node_life(tmp_path: Path) -> None:
    """A kustomization of the user's own that lacks the overlays' replacement still never gets nodes shorter
    lived than its Job: the component asks for the most GKE gives."""
    shipped = (REPO / "overlays" / "gpu" / "kustomization.yaml").read_text()
    start = shipped.index("  # components/flex-start, when listed:")
    docs = _render_variant(tmp_path, "gpu", ("flex-start",), edit=(shipped[start:], ""))
    train = _job(docs, "train")
    assert train["metadata"]["annotations"][MAX_RUN] == str(SEVEN_DAYS)
    assert train["spec"]["activeDeadlineSeconds"] <= SEVEN_DAYS


def test_shipped_overlays_have_no_flex_start_annotation(docs: dict) -> None:
    """The overlays' alignment replacement only touches a Job that carries the annotation."""
    for env in ENVS:
        assert MAX_RUN not in (_job(docs[env], "train")["metadata"].get("annotations") or {}), env


# --- grace periods on on-demand nodes (docs/adr/013) --------------------------------------------------------

# Full fine-tuning checkpoint: bf16 weights (2 bytes per parameter), fp32 master weights (4) and AdamW's two fp32
# moments (8), as DeepSpeed writes them; transformers without DeepSpeed writes 12.
FULL_CHECKPOINT_BYTES_PER_PARAMETER = 14
# Filestore Basic SSD (the premium-rwx class of components/filestore): 350 MiB/s written, per instance.
BASIC_SSD_WRITE = 350 * 2**20
# The largest full fine-tuning each overlay's GPUs hold (16 bytes of model state per parameter in GPU memory;
# README "Multi-node training": sizing): one L4 24 GB, one A100 40 GB, 8 x H100 80 GB, 16 x H100 80 GB.
LARGEST_FULL = {"dev": 1.5e9, "gpu": 2.5e9, "prod": 13e9, "multinode": 30e9}
STEP_IN_FLIGHT = 60  # the step SIGTERM interrupts is finished first
GKE_UPGRADE_WAIT = 3600  # GKE waits at most an hour for a pod during a node upgrade


@pytest.mark.parametrize("env", ENVS)
def test_on_demand_training_has_the_time_of_a_full_checkpoint(env: str, docs: dict) -> None:
    grace = _pod(docs[env], "train")["terminationGracePeriodSeconds"]
    needed = LARGEST_FULL[env] * FULL_CHECKPOINT_BYTES_PER_PARAMETER / BASIC_SSD_WRITE + STEP_IN_FLIGHT
    assert needed <= grace <= GKE_UPGRADE_WAIT, f"{env}: a full checkpoint needs {needed:.0f} s"


def test_the_multinode_overlay_saves_its_full_checkpoint_on_sigterm(docs: dict) -> None:
    """Its training is full fine-tuning, for which CHECKPOINT_ON_SIGTERM=auto saves nothing: it asks for it."""
    settings = load_settings(_pod_environment(docs["multinode"], "train"))
    assert settings.finetuning_type == "full" and settings.checkpoint_on_sigterm == "true"


# --- the Kueue examples in docs/kueue -----------------------------------------------------------------------


def _example(name: str) -> list[dict[str, Any]]:
    return parse(render(REPO / "docs" / "kueue" / name))


def _quantity(value: str | int) -> float:
    text = str(value)
    return gib(text) if text.endswith(("Ki", "Mi", "Gi", "Ti")) else cpu(text)


@pytest.mark.parametrize("env", ENVS)
def test_the_example_queue_admits_each_overlays_jobs(env: str, docs: dict) -> None:
    """The LocalQueue is the one the Jobs name, in their namespace; the ClusterQueue covers every resource they
    request, with quota for a training run of the overlay (all its pods) and its merge at once."""
    example = _example("queue")
    # The version Kueue serves since 0.15, and the only one from 0.20 on.
    assert {d["apiVersion"] for d in example} == {"kueue.x-k8s.io/v1beta2"}
    local = one(example, "LocalQueue")
    cluster_queue = one(example, "ClusterQueue")
    assert local["metadata"] == {"name": _config(docs[env])["KUEUE_QUEUE"], "namespace": "llm-training"}
    assert local["spec"]["clusterQueue"] == cluster_queue["metadata"]["name"]
    assert cluster_queue["spec"]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "llm-training"}}
    (group,) = cluster_queue["spec"]["resourceGroups"]
    (flavor,) = group["flavors"]
    assert flavor["name"] == one(example, "ResourceFlavor")["metadata"]["name"]
    quota = {r["name"]: _quantity(r["nominalQuota"]) for r in flavor["resources"]}
    assert set(group["coveredResources"]) == set(quota)
    wanted: dict[str, float] = {}
    for component in ("train", "merge"):
        job = _job(docs[env], component)
        pods = job["spec"].get("parallelism", 1)
        for container in job["spec"]["template"]["spec"]["containers"]:
            for resource, value in container["resources"]["requests"].items():
                assert resource in quota, f"{resource} is not covered: Kueue would never admit the {component} Job"
                wanted[resource] = wanted.get(resource, 0) + pods * _quantity(value)
    assert all(wanted[r] <= quota[r] for r in wanted), f"{env} wants {wanted}, the example gives {quota}"


def test_the_flex_start_example_provisions_gpus_through_dws_before_admission() -> None:
    example = _example("flex-start")
    check = one(example, "AdmissionCheck")
    config = one(example, "ProvisioningRequestConfig")
    # v1beta2 has no ClusterQueue.spec.admissionChecks: the strategy, without onFlavors, applies to every flavor.
    assert one(example, "ClusterQueue")["spec"]["admissionChecksStrategy"] == {
        "admissionChecks": [{"name": check["metadata"]["name"]}]}
    assert check["spec"]["controllerName"] == "kueue.x-k8s.io/provisioning-request"
    assert check["spec"]["parameters"] == {"apiGroup": "kueue.x-k8s.io", "kind": "ProvisioningRequestConfig",
                                           "name": config["metadata"]["name"]}
    assert config["spec"] == {"provisioningClassName": "queued-provisioning.gke.io",
                              "managedResources": ["nvidia.com/gpu"]}
    # The same queue as without DWS: the Jobs need no change.
    assert one(example, "LocalQueue") == one(_example("queue"), "LocalQueue")
