"""Starting Jobs: a valid unique name, a clean copy of the template, and only what deploy applied."""

from __future__ import annotations

import io
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from invoke.exceptions import Exit
from k8s_fake_cluster import FakeCluster
from k8s_task_objects import DEPLOYED, REGISTRY, deployed, job, local_queue

from k8s_tasks.image import ImageRef
from k8s_tasks.jobs import default_name, job_from_template, plan_start, validate_name
from k8s_tasks.overlays import with_components
from k8s_tasks.plan import run_plan

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def identities(objects: list[dict]) -> list[dict]:
    """The identity ConfigMaps of a deploy (llama-train-<hash>, llama-merge-<hash>)."""
    return [d for d in objects if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("llama-")]


def test_default_names_are_the_original_designs_in_utc() -> None:
    assert default_name("train", NOW) == "llama-train-20260102-030405"
    assert default_name("merge", NOW) == "llama-merge-20260102-030405"


@pytest.mark.parametrize("name", ["Train-1", "-x", "x-", "a_b", "a" * 64, ""])
def test_names_that_are_not_dns_labels_are_refused(name: str) -> None:
    with pytest.raises(Exit, match="at most 63 characters"):
        validate_name(name)


def test_a_copy_of_a_live_job_drops_what_the_server_and_controller_set() -> None:
    live = yaml.safe_load("""
    apiVersion: batch/v1
    kind: Job
    metadata:
      name: llama-train-abc
      namespace: llm-training
      uid: 1234
      resourceVersion: "99"
      creationTimestamp: "2026-01-01T00:00:00Z"
      generation: 1
      managedFields: [{manager: kubectl}]
      labels: {app.kubernetes.io/component: train, controller-uid: 1234, job-name: llama-train-abc,
               batch.kubernetes.io/controller-uid: 1234, batch.kubernetes.io/job-name: llama-train-abc}
      annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}", note: kept}
    spec:
      selector: {matchLabels: {batch.kubernetes.io/controller-uid: 1234}}
      template:
        metadata:
          labels: {app.kubernetes.io/component: train, controller-uid: 1234, job-name: llama-train-abc,
                   batch.kubernetes.io/controller-uid: 1234, batch.kubernetes.io/job-name: llama-train-abc}
        spec: {containers: [{name: train, image: x}]}
    status: {active: 1}
    """)
    copy = job_from_template(live, "llama-train-20260102-030405", {"llama-factory/template": "llama-train-abc"})
    assert copy == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "llama-train-20260102-030405",
            "namespace": "llm-training",
            "labels": {"app.kubernetes.io/component": "train"},
            "annotations": {"note": "kept", "llama-factory/template": "llama-train-abc"},
        },
        "spec": {"template": {"metadata": {"labels": {"app.kubernetes.io/component": "train"}},
                              "spec": {"containers": [{"name": "train", "image": "x"}]}}},
    }
    assert live["metadata"]["name"] == "llama-train-abc"  # the template is left as it was


def test_nothing_deployed_says_to_deploy(tree: Path) -> None:
    with pytest.raises(Exit, match=r"nothing is deployed .* `invoke deploy --env=dev` applies it"):
        plan_start("dev", "train", FakeCluster([]), now=NOW, root=tree)


def test_an_overlay_edited_since_the_deploy_is_refused_with_the_differences(tree: Path) -> None:
    cluster = FakeCluster(deployed("dev", tree))
    kustomization = tree / "overlays/dev/kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("MAX_STEPS=50", "MAX_STEPS=80"))
    with pytest.raises(Exit) as raised:
        plan_start("dev", "train", cluster, now=NOW, root=tree)
    message = raised.value.message
    assert "the configuration of overlays/dev is not deployed" in message
    assert "MAX_STEPS: overlay '80', deployed '50'" in message
    assert "`invoke deploy --env=dev` applies it (it starts no training)" in message


def test_the_image_running_in_the_webui_wins_over_older_deploys(tree: Path) -> None:
    old = ImageRef(REGISTRY, tag="aaaaaaaaaaaa")
    state = deployed("dev", tree, old, created="2026-01-01T09:00:00Z")
    newer = deployed("dev", tree, DEPLOYED["dev"], created="2026-01-01T10:00:00Z")
    cluster = FakeCluster(state + identities(newer))  # the WebUI still runs `old`
    plan, _ = plan_start("dev", "train", cluster, now=NOW, root=tree)
    created = yaml.safe_load(plan.steps[0].stdin)
    assert created["spec"]["template"]["spec"]["containers"][0]["image"] == str(old)
    assert any(str(DEPLOYED["dev"]) in note and "--tag" in note for note in plan.notes)


def test_tag_picks_another_deployed_image(tree: Path) -> None:
    old = ImageRef(REGISTRY, tag="aaaaaaaaaaaa")
    cluster = FakeCluster(deployed("dev", tree, old) + identities(deployed("dev", tree)))
    plan, _ = plan_start("dev", "train", cluster, now=NOW, tag=DEPLOYED["dev"].tag, root=tree)
    assert yaml.safe_load(plan.steps[0].stdin)["spec"]["template"]["spec"]["containers"][0]["image"] == \
        str(DEPLOYED["dev"])
    with pytest.raises(Exit, match=r"no image tagged 'bbbbbbbbbbbb' is deployed"):
        plan_start("dev", "train", cluster, now=NOW, tag="bbbbbbbbbbbb", root=tree)


def test_a_missing_secret_is_named(tree: Path) -> None:
    cluster = FakeCluster([d for d in deployed("gpu", tree) if d["kind"] != "Secret"])
    with pytest.raises(Exit, match=r"needs objects missing from namespace llm-training: Secret/mlflow-config"):
        plan_start("gpu", "train", cluster, now=NOW, root=tree)


def test_a_multinode_job_needs_its_headless_service(tree: Path) -> None:
    """Without llama-train-nodes node 0 has no DNS name and the rendezvous never happens: refused before the
    Job exists. The merge Job (one pod) does not need it."""
    objects = deployed("multinode", tree)
    without = [d for d in objects if (d["kind"], d["metadata"]["name"]) != ("Service", "llama-train-nodes")]
    assert len(without) == len(objects) - 1
    with pytest.raises(Exit, match=r"the train Job needs objects missing from namespace llm-training: "
                                   r"Service/llama-train-nodes; `invoke deploy --env=multinode` creates them"):
        plan_start("multinode", "train", FakeCluster(without), now=NOW, root=tree)
    plan_start("multinode", "merge", FakeCluster(without), now=NOW, root=tree)
    plan_start("multinode", "train", FakeCluster(objects), now=NOW, root=tree)


def test_a_queued_job_keeps_its_queue_and_is_refused_without_its_local_queue(tree: Path) -> None:
    """components/kueue: the Job `invoke train` creates carries its LocalQueue, and Kueue's webhook (not the
    manifest) suspends it. Without that queue (or without Kueue) it would wait forever: refused before it exists."""
    kustomization = tree / "overlays/gpu/kustomization.yaml"
    kustomization.write_text(with_components(kustomization.read_text(), ("kueue",)))
    objects = deployed("gpu", tree)
    with pytest.raises(Exit) as raised:
        plan_start("gpu", "train", FakeCluster(objects), now=NOW, root=tree)
    assert raised.value.message == (
        "the train Job is for Kueue LocalQueue llama-factory (KUEUE_QUEUE, components/kueue), which namespace "
        "llm-training does not have (or Kueue is not installed): it would wait forever. Create the queue "
        "(`kubectl apply -k docs/kueue/queue` is an example), or remove components/kueue from overlays/gpu")
    for component in ("train", "merge"):
        plan, _ = plan_start("gpu", component, FakeCluster(objects + [local_queue("llama-factory")]), now=NOW,
                             root=tree)
        created = yaml.safe_load(plan.steps[0].stdin)
        assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "llama-factory"
        assert "suspend" not in created["spec"]


def test_an_existing_job_name_is_refused(tree: Path) -> None:
    cluster = FakeCluster(deployed("dev", tree) + [job("llama-train-20260102-030405")])
    with pytest.raises(Exit, match="already exists"):
        plan_start("dev", "train", cluster, now=NOW, root=tree)


def test_the_created_jobs_are_valid_kubernetes(started: dict, tmp_path: Path) -> None:
    files = []
    for (env, _), (plan, name, _) in started.items():
        path = tmp_path / f"{env}-{name}.yaml"
        path.write_text(plan.steps[0].stdin)
        files.append(str(path))
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", "1.31",
                             *files], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("env", "region", "note"), [
    ("gpu", None, "shape: 8 CPU, 48 GiB, 1 GPU; sized for g2-standard-24 or a2-highgpu-1g; about $2.00/h on-demand, "
                  "$1.12/h Spot for 1 x g2-standard-24 (us-central1 list prices of 2026-07-30) while it runs"),
    ("multinode", "europe-west4", "shape: 2 pods of 64 CPU, 640 GiB, 8 GPUs each; sized for a3-highgpu-8g; about "
                                  "$225.08/h on-demand, $88.24/h Spot for 2 x a3-highgpu-8g (europe-west4 list "
                                  "prices of 2026-07-30) while it runs"),
])
def test_a_training_plan_notes_its_shape_and_price(env: str, region: str | None, note: str, tree: Path) -> None:
    """What `invoke train --dry-run` prints before anything starts (from the list prices in k8s_tasks/prices.py)."""
    cluster = FakeCluster(deployed(env, tree))
    plan, _ = plan_start(env, "train", cluster, now=NOW, root=tree, region=region)
    assert note in plan.notes
    out = io.StringIO()
    run_plan(plan, dry_run=True, out=out, root=tree)
    assert f"note: {note}" in out.getvalue()
    merge, _ = plan_start(env, "merge", cluster, now=NOW, root=tree, region=region)
    assert not any(n.startswith("shape:") for n in merge.notes)


def test_rollback_runs_the_entrypoint_in_a_job_from_the_merge_template(tree: Path) -> None:
    from k8s_tasks.jobs import plan_rollback

    cluster = FakeCluster(deployed("dev", tree))
    plan, name = plan_rollback("dev", cluster, now=NOW, to="v0002", root=tree)
    merge_plan, _ = plan_start("dev", "merge", cluster, now=NOW, root=tree)
    job, merge_job = yaml.safe_load(plan.steps[0].stdin), yaml.safe_load(merge_plan.steps[0].stdin)
    assert name == job["metadata"]["name"] == "llama-rollback-20260102-030405"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "entrypoint", "rollback", "--to", "v0002"]
    merge_container = merge_job["spec"]["template"]["spec"]["containers"][0]
    assert {k: v for k, v in container.items() if k != "command"} == \
        {k: v for k, v in merge_container.items() if k != "command"}, "the merge Job's settings, storage and lock"
    assert plan.steps[0].argv == ("kubectl", "create", "-f", "-") and "serving v0002" in plan.title
    default, _ = plan_rollback("dev", cluster, now=NOW, root=tree)
    assert yaml.safe_load(default.steps[0].stdin)["spec"]["template"]["spec"]["containers"][0]["command"][-1] == \
        "rollback"
    with pytest.raises(Exit, match=r"--to 'latest': expected a published version such as v0002"):
        plan_rollback("dev", cluster, now=NOW, to="latest", root=tree)
