"""`invoke doctor`: each decision against the fake cluster surface (no API server runs here): a healthy cluster,
every ✗ with its message and fix, RBAC denials, a missing context, a probe pod that never schedules, cannot pull,
times out or finds problems. Never a traceback, and the probe pod is always deleted."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from k8s_fake_cluster import FakeCluster
from k8s_task_objects import DEPLOYED, bound, cpu_node, daemon_set, deployed, event, gpu_node, pod_state

from entrypoint.probe import Check
from k8s_tasks.doctor import run_doctor
from k8s_tasks.follow import Pace
from k8s_tasks.jobs import deployed_template
from k8s_tasks.probe_pod import probe_pod

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
PROBE_OUTPUT = [
    "2026-01-02 03:04:31,000 INFO entrypoint: settings loaded",
    *Check("ok", "storage /storage/output", "UID 10001 GID 10001 writes, reads and deletes files there "
           "(LORA_OUTPUT_PATH)").lines(),
    *Check("ok", "storage /storage/models", "UID 10001 GID 10001 writes, reads and deletes files there "
           "(MERGED_MODEL_PATH's directory)").lines(),
    *Check("ok", "storage /storage", "UID 10001 GID 10001 writes, reads and deletes files there (WEBUI_WORKDIR)"
           ).lines(),
    *Check("ok", "base model /storage/models/base-model", "llama model, 4 safetensors file(s), 15.0 GiB, tokenizer "
           "present").lines(),
    *Check("ok", "dataset train_data", "found in /storage/data: /storage/data/train_data.json (every record is "
           "checked when training starts)").lines(),
    *Check("ok", "MLflow http://mlflow.mlflow.svc.cluster.local:5000", "answered within 10s "
           "(MLFLOW_TIMEOUT_SECONDS)").lines(),
    "probe: all 6 checks passed",
]


def healthy(env: str, root: Path) -> list[dict[str, Any]]:
    """What a ready cluster holds: the deploy, the storage Bound, a GPU pool of the overlay's machine, a CPU node,
    Dataplane V2."""
    gpu = {"dev": gpu_node(machine="g2-standard-8", cpu="7910m", memory="28732416Ki", gpus=1)}.get(env, gpu_node())
    return [*bound(deployed(env, root)), gpu, cpu_node(), daemon_set("anetd", "cilium")]


def runs(states: list[Callable[[dict], dict]], log: list[str] | None = None) -> Callable:
    """A probe function for the fake cluster: the pod's states (made from the manifest it was created with)."""
    return lambda manifest: ([make(manifest) for make in states], list(log or []))


SUCCEEDS = runs([lambda m: pod_state(m, "Pending", waiting=("ContainerCreating", "")),
                 lambda m: pod_state(m, "Running"),
                 lambda m: pod_state(m, "Succeeded", exit_code=0)], PROBE_OUTPUT)


class Clock:
    """The doctor's pace: every sleep moves the fake cluster one state on and the clock by the poll interval."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.now, self.cluster = 0.0, cluster

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.cluster.advance()

    def pace(self) -> Pace:
        return Pace(poll=2.0, sleep=self.sleep, clock=lambda: self.now)


def doctor(env: str, cluster: FakeCluster | None, root: Path, environ: dict[str, str], *, timeout: float = 60,
           probe: bool = True) -> tuple[list[Check], str]:
    out = io.StringIO()

    def connect() -> FakeCluster:
        assert cluster is not None, "the doctor connected although the kube context is missing"
        return cluster

    pace = Clock(cluster).pace() if cluster is not None else Pace()
    checks = run_doctor(env, connect=connect, out=out, probe=probe, timeout=timeout, pace=pace, now=NOW,
                        root=root, environ=environ)
    return checks, out.getvalue()


def line(checks: list[Check], title: str) -> Check:
    (found,) = [c for c in checks if c.title.startswith(title)]
    return found


def failed(checks: list[Check]) -> list[str]:
    return [c.title for c in checks if c.status == "fail"]


def test_a_healthy_cluster_passes_every_check_and_the_probe_pod_is_deleted(tree: Path, environ: dict) -> None:
    cluster = FakeCluster(healthy("gpu", tree), probe=SUCCEEDS)
    checks, out = doctor("gpu", cluster, tree, environ)
    print(out)  # the closing report quotes it
    assert failed(checks) == []
    assert [c.title for c in checks if c.status == "unknown"] == []
    assert line(checks, "GPU nodes").detail.startswith("pool gpu-l4: 1 node(s) g2-standard-24, on-demand")
    assert line(checks, "network policies").detail == "enforced by GKE Dataplane V2 (anetd)"
    assert "Bound to llama-storage-nfs (NFS 10.0.0.2:/llama-storage, 200Gi, ReadWriteMany)" in out
    assert line(checks, "probe pod").detail.startswith("ran on node gke-train-default-pool-1")
    # The probe's own lines are relayed, indented under the probe pod's.
    assert "\n  ✓ storage /storage/output: UID 10001 GID 10001 writes" in out
    assert line(checks, "cost").detail == ("a training Job (8 CPU, 48 GiB, 1 GPU) holds about $2.00/h on-demand "
                                           "(this pool), $1.12/h Spot for 1 x g2-standard-24 (us-central1 list "
                                           "prices of 2026-07-30)")
    assert out.endswith("doctor: everything overlays/gpu needs is in place\n")
    # The pod it created is the training pod's probe (the deployed image, no GPU), and it is gone.
    template, _, _ = deployed_template("gpu", "train", cluster, root=tree)
    (created,) = cluster.created
    assert created == probe_pod(template, created["metadata"]["name"], deadline_seconds=60)
    assert created["spec"]["containers"][0]["image"] == str(DEPLOYED["gpu"])
    assert cluster.deleted == [created["metadata"]["name"]] and cluster.pods() == []


def test_a_missing_kube_context_is_one_line_and_nothing_is_contacted(tree: Path, environ: dict) -> None:
    checks, out = doctor("gpu", None, tree, {**environ, "KUBECONFIG": str(tree / "no-kubeconfig")})
    assert [(c.status, c.title) for c in checks] == [("fail", "kube context")]
    assert "no Kubernetes context" in checks[0].detail
    assert "gcloud container clusters get-credentials" in checks[0].fix
    assert out.endswith("doctor: 1 problem(s) to fix (✗ above)\n")


def test_an_unreachable_api_server_stops_after_one_line(tree: Path, environ: dict) -> None:
    checks, _ = doctor("gpu", FakeCluster(healthy("gpu", tree), unreachable=True), tree, environ)
    assert [(c.status, c.title) for c in checks] == [("ok", "kube context"), ("fail", "API server"),
                                                     ("unknown", "other checks")]
    assert "cannot reach the cluster of kube context fake-context" in checks[1].detail


def test_a_kubernetes_older_than_the_jobs_need_is_refused(tree: Path, environ: dict) -> None:
    cluster = FakeCluster(healthy("gpu", tree), version=(1, 30, "v1.30.9-gke.100"), probe=SUCCEEDS)
    checks, _ = doctor("gpu", cluster, tree, environ)
    api = line(checks, "API server")
    assert api.status == "fail" and "older than 1.31, the first with podFailurePolicy GA" in api.detail
    assert "--cluster-version=1.31" in api.fix


@pytest.mark.parametrize(("call", "title", "fix"), [
    ("list Node", "GPU nodes", "kubectl auth can-i list nodes"),
    ("list DaemonSet", "network policies", "kubectl auth can-i list daemonsets -n kube-system"),
    ("get Namespace", "namespace llm-training", "read access to namespace llm-training"),
    ("get Secret", "Secret mlflow-config", "read access to Secrets"),
    ("get PersistentVolumeClaim", "storage claim", "read access to namespace llm-training"),
    ("list ConfigMap", "deployed configuration", "read access to namespace llm-training"),
    ("create Pod", "probe pod", "`create`, `get`, `delete` on pods"),
])
def test_an_rbac_denial_is_one_line_with_what_access_to_ask_for(call: str, title: str, fix: str, tree: Path,
                                                                environ: dict) -> None:
    cluster = FakeCluster(healthy("gpu", tree), denied={call}, probe=SUCCEEDS)
    checks, out = doctor("gpu", cluster, tree, environ)
    assert failed(checks) == [line(checks, title).title]
    assert "(403 Forbidden)" in line(checks, title).detail and fix in line(checks, title).fix
    assert "Traceback" not in out and cluster.pods() == []


def test_no_node_with_the_gpu_label_names_the_pool_to_create(tree: Path, environ: dict) -> None:
    objects = [*bound(deployed("gpu", tree)), gpu_node(gpu_label=False), cpu_node(), daemon_set("anetd", "cilium")]
    checks, _ = doctor("gpu", FakeCluster(objects, probe=SUCCEEDS), tree, environ)
    nodes = line(checks, "GPU nodes")
    assert failed(checks) == ["GPU nodes"]
    assert nodes.detail.startswith("no node carries nvidia.com/gpu=true, the training pod's nodeSelector (pools "
                                   "now: default-pool, gpu-l4)")
    assert ("--machine-type=g2-standard-24 --accelerator=type=nvidia-l4,count=2,gpu-driver-version=default "
            "--node-labels=nvidia.com/gpu=true") in nodes.fix
    assert "autoscales from 0" in nodes.fix


@pytest.mark.parametrize(("node", "reason"), [
    (gpu_node(machine="g2-standard-8", cpu="7910m", memory="28732416Ki", gpus=1),
     "7.4 CPU and 26.4 GiB left after GKE's own pods (assumed 0.5 CPU, 1 GiB) for 8 CPU and 48 GiB requested"),
    (gpu_node(gpus=0), "0 allocatable nvidia.com/gpu for 1 requested (no GPU driver"),
    (gpu_node(spot=True, taints=[{"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"}]),
     "tainted cloud.google.com/gke-spot=true:NoSchedule, which the pod does not tolerate"),
    (gpu_node(ready=False), "not Ready"),
])
def test_gpu_nodes_that_cannot_take_the_training_pod_say_why(node: dict, reason: str, tree: Path,
                                                             environ: dict) -> None:
    objects = [*bound(deployed("gpu", tree)), node, cpu_node(), daemon_set("anetd", "cilium")]
    checks, _ = doctor("gpu", FakeCluster(objects, probe=SUCCEEDS), tree, environ)
    nodes = line(checks, "GPU nodes")
    assert failed(checks) == ["GPU nodes"]
    assert "but none can run the training pod (8 CPU, 48 GiB, 1 GPU)" in nodes.detail and reason in nodes.detail
    assert "g2-standard-24 (24 vCPU, 96 GB, 2 x nvidia-l4) or a2-highgpu-1g" in nodes.fix


def test_a_spot_pool_is_said_and_priced_as_spot(tree: Path, environ: dict) -> None:
    objects = [*bound(deployed("gpu", tree)), gpu_node(spot=True, region="europe-west4"), cpu_node(),
               daemon_set("anetd", "cilium")]
    checks, _ = doctor("gpu", FakeCluster(objects, probe=SUCCEEDS), tree, environ)
    assert ", Spot; allocatable 23.9 CPU, 85.8 GiB, 2 x nvidia-l4" in line(checks, "GPU nodes").detail
    assert line(checks, "cost").detail == ("a training Job (8 CPU, 48 GiB, 1 GPU) holds about $1.10/h Spot (this "
                                           "pool), $2.10/h on-demand for 1 x g2-standard-24 (europe-west4 list "
                                           "prices of 2026-07-30)")


def test_a_multinode_job_with_fewer_nodes_up_than_pods_is_a_question(tree: Path, environ: dict) -> None:
    node = gpu_node(machine="a3-highgpu-8g", cpu="207410m", memory="1858797568Ki", gpus=8,
                    accelerator="nvidia-h100-80gb")
    objects = [*bound(deployed("multinode", tree)), node, cpu_node(), daemon_set("anetd", "cilium")]
    checks, _ = doctor("multinode", FakeCluster(objects, probe=SUCCEEDS), tree, environ)
    nodes = line(checks, "GPU nodes")
    assert nodes.status == "unknown" and "the Job runs 2 pods at once and 1 such node(s) are up" in nodes.detail
    assert "2 x a3-highgpu-8g" in line(checks, "cost").detail
    assert failed(checks) == []


def test_no_network_policy_enforcement_is_a_warning_that_the_policies_are_inert(tree: Path, environ: dict) -> None:
    objects = [d for d in healthy("gpu", tree) if d["kind"] != "DaemonSet"] + [daemon_set("kube-proxy", "kube-proxy")]
    checks, out = doctor("gpu", FakeCluster(objects, probe=SUCCEEDS), tree, environ)
    policies = line(checks, "network policies")
    assert policies.status == "unknown" and "accepted but inert" in policies.detail
    assert "--enable-dataplane-v2" in policies.fix and "--update-addons=NetworkPolicy=ENABLED" in policies.fix
    assert failed(checks) == []
    assert "1 line(s) marked ? could not be decided here" in out


@pytest.mark.parametrize("enforcer", [("calico-node", "calico-node", "Calico"), ("cilium", "cilium", "Cilium")])
def test_calico_or_cilium_enforce_the_policies(enforcer: tuple[str, str, str], tree: Path, environ: dict) -> None:
    name, app, what = enforcer
    objects = [d for d in healthy("gpu", tree) if d["kind"] != "DaemonSet"] + [daemon_set(name, app)]
    checks, _ = doctor("gpu", FakeCluster(objects, probe=SUCCEEDS), tree, environ)
    assert line(checks, "network policies").detail == f"enforced by {what}"


def test_nothing_deployed_names_the_deploy_and_starts_no_probe(tree: Path, environ: dict) -> None:
    objects = [gpu_node(), cpu_node(), daemon_set("anetd", "cilium")]
    cluster = FakeCluster(objects, probe=SUCCEEDS)
    checks, out = doctor("gpu", cluster, tree, environ)
    assert failed(checks) == ["namespace llm-training", "Secret mlflow-config", "storage claim llama-storage",
                              "deployed configuration"]
    assert all(c.fix.startswith("`invoke deploy --env=gpu") for c in checks if c.status == "fail")
    assert line(checks, "deployed configuration").detail == (
        "nothing is deployed for train Jobs in namespace llm-training: `invoke deploy --env=gpu` applies it (it "
        "starts no training)")
    probe = line(checks, "probe pod")
    assert probe.status == "unknown" and "not started" in probe.detail
    assert cluster.created == []


def test_an_overlay_changed_since_the_deploy_names_the_keys(tree: Path, environ: dict) -> None:
    objects = healthy("gpu", tree)
    kustomization = tree / "overlays" / "gpu" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("ADAPTER_WAIT_SECONDS=86400",
                                                               "ADAPTER_WAIT_SECONDS=600"))
    checks, _ = doctor("gpu", FakeCluster(objects, probe=SUCCEEDS), tree, environ)
    assert failed(checks) == ["deployed configuration"]
    assert line(checks, "deployed configuration").detail.endswith(
        "in: ADAPTER_WAIT_SECONDS: overlay '600', deployed '86400'")


def test_a_claim_bound_to_nothing_because_its_volume_is_released(tree: Path, environ: dict) -> None:
    objects = healthy("gpu", tree)
    for doc in objects:
        if doc["kind"] == "PersistentVolumeClaim":
            doc["status"] = {"phase": "Pending"}
            doc["metadata"]["uid"] = "claim-uid-2"  # the namespace was deleted and deployed again
        if doc["kind"] == "PersistentVolume":
            doc["status"] = {"phase": "Released"}
    cluster = FakeCluster(objects, probe=SUCCEEDS)
    checks, _ = doctor("gpu", cluster, tree, environ)
    claim = line(checks, "storage claim")
    assert failed(checks) == ["storage claim llama-storage"]
    assert claim.detail.startswith("Pending, bound to no volume: llama-storage-nfs is Released, still reserved for "
                                   "an earlier claim")
    assert claim.fix == ("release it for the new claim: `kubectl patch pv llama-storage-nfs --type=json "
                         "-p='[{\"op\": \"remove\", \"path\": \"/spec/claimRef/uid\"}]'`")
    assert cluster.created == []


def test_a_claim_whose_volume_is_missing(tree: Path, environ: dict) -> None:
    objects = [d for d in healthy("gpu", tree) if d["kind"] != "PersistentVolume"]
    for doc in objects:
        if doc["kind"] == "PersistentVolumeClaim":
            doc["status"] = {"phase": "Pending"}
    checks, _ = doctor("gpu", FakeCluster(objects, probe=SUCCEEDS), tree, environ)
    claim = line(checks, "storage claim")
    assert claim.detail == ("Pending, bound to no volume: its PersistentVolume llama-storage-nfs does not exist")
    assert claim.fix == "`invoke deploy --env=gpu` (README: Quickstart)"


def test_a_filestore_claim_that_cannot_be_provisioned(tree: Path, environ: dict) -> None:
    objects = [d for d in healthy("gpu", tree) if d["kind"] != "PersistentVolume"]
    for doc in objects:
        if doc["kind"] == "PersistentVolumeClaim":
            doc["spec"].update(storageClassName="standard-rwx", volumeName=None)
            doc["status"] = {"phase": "Pending"}
    failing = [*objects, event("PersistentVolumeClaim", "llama-storage", "ProvisioningFailed",
                               "failed to provision volume with StorageClass \"standard-rwx\": rpc error: code = "
                               "InvalidArgument desc = request size 214748364800 is below the tier's minimum")]
    checks, _ = doctor("gpu", FakeCluster(failing, probe=SUCCEEDS), tree, environ)
    claim = line(checks, "storage claim")
    assert claim.status == "fail" and "ProvisioningFailed: failed to provision volume" in claim.detail
    assert "GcpFilestoreCsiDriver" in claim.fix
    waiting_checks, _ = doctor("gpu", FakeCluster(objects, probe=SUCCEEDS), tree, environ)
    assert line(waiting_checks, "storage claim").status == "unknown"


def test_a_probe_that_never_schedules_stops_at_the_autoscalers_verdict(tree: Path, environ: dict) -> None:
    message = "0/2 nodes are available: 1 Insufficient memory, 1 node(s) had untolerated taint {dedicated: x}."
    probe = runs([lambda m: pod_state(m, unschedulable=message)])
    cluster = FakeCluster(healthy("gpu", tree), probe=probe)
    # The autoscaler's event is there once the pod exists: the fake serves it for any probe pod name.
    cluster.timeline[0].append(_event_for_created(cluster, "NotTriggerScaleUp",
                                                  "pod didn't trigger scale-up: 2 max node group size reached"))
    checks, out = doctor("gpu", cluster, tree, environ, timeout=600)
    probe_check = line(checks, "probe pod")
    assert failed(checks) == [probe_check.title]
    assert probe_check.detail == f"no node can run it ({message}; the autoscaler: pod didn't trigger scale-up: " \
                                 "2 max node group size reached)"
    assert "add a CPU pool" in probe_check.fix
    assert cluster.deleted == [cluster.created[0]["metadata"]["name"]] and cluster.pods() == []
    assert "Traceback" not in out


def test_a_probe_that_times_out_is_deleted_and_names_the_mount_problem(tree: Path, environ: dict) -> None:
    probe = runs([lambda m: pod_state(m, "Pending", waiting=("ContainerCreating", ""))])
    cluster = FakeCluster(healthy("gpu", tree), probe=probe)
    cluster.timeline[0].append(_event_for_created(
        cluster, "FailedMount", "MountVolume.SetUp failed for volume \"llama-storage-nfs\" : mount failed: exit "
        "status 32 ... mount.nfs: Connection timed out"))
    checks, _ = doctor("gpu", cluster, tree, environ, timeout=30)
    probe_check = line(checks, "probe pod")
    assert probe_check.status == "fail"
    assert probe_check.detail.startswith("did not finish within 30s: ContainerCreating; last warning: FailedMount: ")
    assert "reachable on TCP 2049" in probe_check.fix
    assert cluster.pods() == [] and len(cluster.deleted) == 1


def test_an_image_pull_failure_is_named_with_the_registry_permission_to_grant(tree: Path, environ: dict) -> None:
    message = ("failed to pull and unpack image: failed to resolve reference: unexpected status from HEAD request: "
               "403 Forbidden")
    probe = runs([lambda m: pod_state(m, "Pending", waiting=("ErrImagePull", message)),
                  lambda m: pod_state(m, "Pending", waiting=("ImagePullBackOff", "Back-off pulling image"))])
    cluster = FakeCluster(healthy("gpu", tree), probe=probe)
    checks, _ = doctor("gpu", cluster, tree, environ)
    probe_check = line(checks, "probe pod")
    assert probe_check.detail == f"cannot pull the image (ErrImagePull: {message})"
    assert probe_check.fix.startswith("the nodes' service account needs the Artifact Registry Reader role on the "
                                      "repository: `gcloud artifacts repositories add-iam-policy-binding training "
                                      "--location=europe-west4 --project=my-project")
    assert cluster.pods() == []


def test_an_image_missing_from_the_registry_says_to_push_it(tree: Path, environ: dict) -> None:
    probe = runs([lambda m: pod_state(m, "Pending", waiting=("ImagePullBackOff", "manifest unknown: not found"))])
    checks, _ = doctor("gpu", FakeCluster(healthy("gpu", tree), probe=probe), tree, environ)
    assert "`invoke build push`" in line(checks, "probe pod").fix


def test_problems_the_probe_finds_are_relayed_and_fail_the_doctor(tree: Path, environ: dict) -> None:
    findings = [
        *Check("fail", "storage /storage/output", "UID 10001 GID 10001 cannot create a file there (Permission "
               "denied; it is owned by 0:0, mode 755); written through LORA_OUTPUT_PATH", "make it writable by UID "
               "10001: `invoke prepare-storage --env=<env>`").lines(),
        *Check("ok", "dataset train_data", "found").lines(),
        "error: probe: 1 check(s) failed: storage /storage/output",
    ]
    probe = runs([lambda m: pod_state(m, "Failed", exit_code=78, message="exit 78: probe: 1 check(s) failed")],
                 findings)
    cluster = FakeCluster(healthy("gpu", tree), probe=probe)
    checks, out = doctor("gpu", cluster, tree, environ)
    assert failed(checks) == ["storage /storage/output"]
    assert line(checks, "probe pod").detail.endswith("it found the problems below")
    assert "\n  ✗ storage /storage/output: UID 10001 GID 10001 cannot create a file there" in out
    # The pod's fix names `<env>`; the doctor, which knows the overlay, names it.
    assert "\n      fix: make it writable by UID 10001: `invoke prepare-storage --env=gpu`" in out
    assert cluster.pods() == []


def test_a_probe_refused_by_its_configuration_shows_the_reason(tree: Path, environ: dict) -> None:
    reason = ("exit 78: MLFLOW_TRACKING_URI is empty while TRACKING=mlflow: set it in the mlflow-config Secret, "
              "or set TRACKING=none to train without tracking")
    probe = runs([lambda m: pod_state(m, "Failed", exit_code=78, message=reason)], ["error: " + reason[9:]])
    checks, _ = doctor("gpu", FakeCluster(healthy("gpu", tree), probe=probe), tree, environ)
    probe_check = line(checks, "probe pod")
    assert probe_check.status == "fail"
    assert probe_check.detail.endswith("then failed: exit 78 (configuration or input error: retrying cannot help, "
                                       "the Job fails at once): MLFLOW_TRACKING_URI is empty while TRACKING=mlflow: "
                                       "set it in the mlflow-config Secret, or set TRACKING=none to train without "
                                       "tracking")
    assert "`invoke deploy --env=gpu`" in probe_check.fix


def test_a_probe_pod_that_cannot_be_deleted_says_how_to_delete_it(tree: Path, environ: dict) -> None:
    cluster = FakeCluster(healthy("gpu", tree), probe=SUCCEEDS, denied={"delete Pod"})
    checks, _ = doctor("gpu", cluster, tree, environ)
    probe_check = line(checks, "probe pod")
    name = cluster.created[0]["metadata"]["name"]
    assert probe_check.status == "fail"
    assert probe_check.fix.endswith(f"`kubectl delete pod -n llm-training {name}`")


def test_an_interrupted_doctor_still_deletes_its_probe_pod(tree: Path, environ: dict) -> None:
    cluster = FakeCluster(healthy("gpu", tree), probe=runs([lambda m: pod_state(m, "Pending")]))

    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_doctor("gpu", connect=lambda: cluster, out=io.StringIO(), pace=Pace(sleep=interrupt), now=NOW,
                   root=tree, environ=environ)
    assert len(cluster.created) == 1 and cluster.pods() == []


def test_no_probe_leaves_the_storage_unchecked_but_creates_nothing(tree: Path, environ: dict) -> None:
    cluster = FakeCluster(healthy("dev", tree), probe=SUCCEEDS)
    checks, _ = doctor("dev", cluster, tree, environ, probe=False)
    assert line(checks, "probe pod").status == "unknown" and cluster.created == []
    assert failed(checks) == []


def _event_for_created(cluster: FakeCluster, reason: str, message: str) -> Any:
    """An event about the probe pod, whatever name it gets: the fake's events() matches on (kind, name)."""
    from k8s_fake_cluster import model

    name = f"llama-probe-{NOW:%Y%m%d-%H%M%S}"
    return model(event("Pod", name, reason, message))


def test_an_api_server_that_stops_answering_halfway_gives_lines_not_a_traceback(tree: Path, environ: dict) -> None:
    class Flaky(FakeCluster):
        def nodes(self) -> list[Any]:
            self.unreachable = True  # from here on, every call fails as a dropped connection does
            return super().nodes()

    cluster = Flaky(healthy("gpu", tree), probe=SUCCEEDS)
    checks, out = doctor("gpu", cluster, tree, environ)
    assert failed(checks) == ["GPU nodes", "network policies", "namespace llm-training", "Secret mlflow-config",
                              "storage claim", "deployed configuration"]
    assert all("cannot reach the cluster" in c.detail for c in checks if c.status == "fail")
    assert line(checks, "probe pod").status == "unknown" and cluster.created == []


def test_a_probe_whose_pod_cannot_be_read_is_still_deleted(tree: Path, environ: dict) -> None:
    cluster = FakeCluster(healthy("gpu", tree), probe=SUCCEEDS, denied={"get Pod"})
    checks, _ = doctor("gpu", cluster, tree, environ)
    probe_check = line(checks, "probe pod")
    assert probe_check.status == "fail" and probe_check.detail.startswith("lost sight of it: ")
    assert len(cluster.created) == 1 and cluster.pods() == []
