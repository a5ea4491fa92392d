"""Jobs are immutable: their names cover everything they run (docs/adr/009-job-name-covers-spec.md).

Re-applying an unchanged overlay sends the very same Jobs (a no-op). A change to anything in a Job's spec (GPUs,
CPU and memory, nodeSelector, tolerations, /dev/shm, podFailurePolicy, the image) or to its configuration gives
that Job a new name, so `kubectl apply` creates a new Job instead of being refused: the API server rejects any
change to an existing Job's pod template. A Job whose spec and configuration did not change keeps its name.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from kustomize_helpers import env_of

from k8s_tasks.overlays import ENVS, find, one, parse, render

COMPONENTS = ("train", "merge")


def _jobs(docs: list[dict]) -> dict[str, str]:
    return {c: one(docs, "Job", c)["metadata"]["name"] for c in COMPONENTS}


def _llm_config(docs: list[dict]) -> dict:
    return next(d for d in docs if d["metadata"]["name"].startswith("llm-config-"))


@pytest.mark.parametrize("overlay", ENVS)
def test_job_names_carry_a_hash_and_the_pods_read_their_identity(overlay: str, docs: dict) -> None:
    config = _llm_config(docs[overlay])["data"]
    for component in COMPONENTS:
        job = one(docs[overlay], "Job", component)
        assert re.fullmatch(rf"llama-{component}-[a-z0-9]{{10}}", job["metadata"]["name"])
        (container,) = job["spec"]["template"]["spec"]["containers"]
        ref = env_of(container)["IMAGE"]["configMapKeyRef"]
        assert re.fullmatch(rf"llama-{component}-identity-[a-z0-9]{{10}}", ref["name"]) and ref["key"] == "IMAGE"
        identity = next(d for d in find(docs[overlay], "ConfigMap") if d["metadata"]["name"] == ref["name"])
        # What `invoke train` reads from the cluster: the configuration and the image these Jobs run.
        assert identity["data"] == {**config, "IMAGE": container["image"]}, component
    # The ConfigMaps that name the Jobs are local to kustomize: hashed, never applied.
    config_maps = {d["metadata"]["name"] for d in find(docs[overlay], "ConfigMap")}
    assert not config_maps & {*_jobs(docs[overlay]).values(), *(f"llama-{c}" for c in COMPONENTS)}
    assert all("JOB_SPEC" not in (d.get("data") or {}) for d in docs[overlay])


def test_each_overlay_has_its_own_job_names(docs: dict) -> None:
    names = [name for overlay in ENVS for name in _jobs(docs[overlay]).values()]
    assert len(set(names)) == len(names)


def _variant(tree: Path, tmp_path: Path, overlay: str, patch: str | None = None,
             edit: tuple[str, str, str] | None = None) -> list[dict]:
    """The overlay rendered after one change: a strategic-merge patch added to it, or a text edit of a file."""
    variant = tmp_path / "variant"
    shutil.copytree(tree, variant, ignore=shutil.ignore_patterns("render-*.yaml", "filestore-example"))
    directory = variant / "overlays" / overlay
    if patch is not None:
        (directory / "patches" / "variant.change.yaml").write_text(patch)
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        kustomization["patches"].append({"path": "patches/variant.change.yaml"})
        (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    if edit is not None:
        path, old, new = edit
        text = (variant / path).read_text()
        assert old in text, f"{old!r} not in {path}"
        (variant / path).write_text(text.replace(old, new, 1))
    return parse(render(directory))


def _job_patch(component: str, spec: str) -> str:
    return f"apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: llama-{component}\nspec:\n{spec}"


def _container(component: str, body: str) -> str:
    return f"  template:\n    spec:\n      containers:\n        - name: {component}\n{body}"


def _resources(component: str, values: str) -> str:
    return _job_patch(component, _container(component, "          resources:\n" + "".join(
        f"            {kind}:\n{values}" for kind in ("requests", "limits"))))


def _pod(component: str, body: str) -> str:
    return _job_patch(component, f"  template:\n    spec:\n{body}")


FAILURE_RULES = """  podFailurePolicy:
    rules:
      - action: FailJob
        onExitCodes:
          containerName: {c}
          operator: In
          values: [78, 2]
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
"""
SPOT = """      tolerations:
        - key: nvidia.com/gpu
          operator: Exists
          effect: NoSchedule
        - key: cloud.google.com/gke-spot
          operator: Equal
          value: "true"
          effect: NoSchedule
"""
# Each change, what it is applied with, and which Jobs it changes (the others must keep their names).
VARIANTS = {
    "GPU count": (dict(patch=_resources("train", '              nvidia.com/gpu: 2\n')), {"train"}),
    "train CPU and memory": (dict(patch=_resources("train", '              cpu: "5"\n              memory: 40Gi\n')),
                             {"train"}),
    "merge CPU and memory": (dict(patch=_resources("merge", '              cpu: "3"\n              memory: 6Gi\n')),
                             {"merge"}),
    "nodeSelector": (dict(patch=_pod("train", "      nodeSelector:\n        cloud.google.com/gke-accelerator: "
                                              "nvidia-a100-80gb\n")), {"train"}),
    "tolerations": (dict(patch=_pod("train", SPOT)), {"train"}),
    "merge tolerations": (dict(patch=_pod("merge", SPOT)), {"merge"}),
    "/dev/shm size": (dict(patch=_pod("train", "      volumes:\n        - name: dshm\n          emptyDir:\n"
                                               "            medium: Memory\n            sizeLimit: 12Gi\n")),
                      {"train"}),
    "podFailurePolicy": (dict(patch=_job_patch("train", FAILURE_RULES.format(c="train"))), {"train"}),
    "merge podFailurePolicy": (dict(patch=_job_patch("merge", FAILURE_RULES.format(c="merge"))), {"merge"}),
    "LORA_RANK (llm-config)": (dict(edit=("base/llm-config.env", "\nLORA_RANK=8\n", "\nLORA_RANK=16\n")),
                               {"train", "merge"}),
    "image": (dict(edit=("overlays/gpu/kustomization.yaml", 'newTag: "0.1.0"', 'newTag: "0.1.1"')),
              {"train", "merge"}),
    "a base file (train backoffLimit)": (dict(edit=("base/job-train.yaml", "backoffLimit: 6", "backoffLimit: 5")),
                                         {"train"}),
    "a component file (the GPU patch)": (dict(edit=("components/gpu/patches/job-train.gpu.yaml",
                                                    "sizeLimit: 8Gi", "sizeLimit: 9Gi")), {"train"}),
    "the WebUI only": (dict(edit=("base/deployment-webui.yaml", "periodSeconds: 30", "periodSeconds: 40")), set()),
}


@pytest.mark.parametrize("change", sorted(VARIANTS))
def test_a_changed_job_gets_a_new_name_and_the_others_keep_theirs(change: str, manifest_tree: Path, tmp_path: Path,
                                                                   docs: dict) -> None:
    how, changed = VARIANTS[change]
    before_docs = docs["gpu"]
    after_docs = _variant(manifest_tree, tmp_path, "gpu", **how)
    before, after = _jobs(before_docs), _jobs(after_docs)
    for component in COMPONENTS:
        old = one(before_docs, "Job", component)
        new = one(after_docs, "Job", component)
        # A config change reaches the spec too: the hashed llm-config name it reads from.
        assert (old["spec"] != new["spec"]) == (component in changed), f"{change}: the {component} Job's spec"
        if component in changed:
            assert after[component] != before[component], f"{change}: {component} kept {before[component]}"
        else:
            assert after[component] == before[component], f"{change}: {component} renamed for nothing"


@pytest.mark.parametrize("overlay", ENVS)
def test_every_overlay_names_its_jobs_after_their_final_spec(overlay: str, manifest_tree: Path, tmp_path: Path,
                                                             docs: dict) -> None:
    """Each overlay copies its Jobs' final specs into their names (the replacement only the overlay can run): a
    patch in the overlay itself renames the Job it changes."""
    after = _variant(manifest_tree, tmp_path, overlay, patch=_job_patch("merge", "  backoffLimit: 1\n"))
    assert _jobs(after)["merge"] != _jobs(docs[overlay])["merge"]
    assert _jobs(after)["train"] == _jobs(docs[overlay])["train"]


def test_new_credentials_leave_the_jobs_unchanged(manifest_tree: Path, tmp_path: Path, docs: dict) -> None:
    """The Secret keeps one name: rotating credentials re-applies the Jobs as they are (no new training)."""
    after = _variant(manifest_tree, tmp_path, "gpu",
                     edit=("overlays/gpu/mlflow.env", "MLFLOW_TRACKING_TOKEN=", "MLFLOW_TRACKING_TOKEN=x"))
    assert one(after, "Secret") != one(docs["gpu"], "Secret")
    assert [one(after, "Job", c) for c in COMPONENTS] == [one(docs["gpu"], "Job", c) for c in COMPONENTS]


def test_a_config_change_rolls_the_webui_too(manifest_tree: Path, tmp_path: Path, docs: dict) -> None:
    after = _variant(manifest_tree, tmp_path, "gpu", **VARIANTS["LORA_RANK (llm-config)"][0])
    webui = one(after, "Deployment", "webui")["spec"]["template"]["spec"]["containers"][0]
    assert webui["envFrom"][0]["configMapRef"]["name"] == _llm_config(after)["metadata"]["name"]
    assert _llm_config(after)["metadata"]["name"] != _llm_config(docs["gpu"])["metadata"]["name"]
