"""`invoke doctor --env=<env>`: does the current kube context have what overlays/<env> needs, before a GPU pod waits?

One line per check, `✓` / `✗` / `?`, a fix under every `✗`; the task exits 1 when anything is `✗` (`?` is what
cannot be told from here, or a warning). In order:

- the kube context, and an API server that answers with a supported Kubernetes version;
- nodes that carry the training pod's nodeSelector and fit its requests (allocatable CPU, memory, GPUs, taints it
  tolerates), Spot or not;
- network policy enforcement (GKE Dataplane V2, Cilium or Calico), else the policies are inert;
- the namespace, the mlflow-config Secret, the storage claim Bound to a volume, a deployed configuration;
- a probe pod (k8s_tasks/probe_pod.py): the training pod without its GPU, running `python -m entrypoint probe`:
  that it starts at all proves the image pulls; it then checks the storage as UID 10001, the model, the data and
  MLflow through the real network policies. It is bounded in time and always deleted.

Then what a training Job of the overlay costs per hour on the pool found. Every read goes through the Cluster
surface (k8s_tasks/cluster.py), so the tests run each decision against a fake of it.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from invoke.exceptions import Exit

from entrypoint.probe import Check, parse_lines
from k8s_tasks.cluster import ApiDenied, ApiUnreachable, Cluster, kubeconfig_problem
from k8s_tasks.follow import Pace
from k8s_tasks.image import ImageRef
from k8s_tasks.jobs import deployed_template
from k8s_tasks.overlays import NAMESPACE, one, render_overlay
from k8s_tasks.prices import estimate
from k8s_tasks.probe_pod import CONTAINER, probe_name, probe_pod
from k8s_tasks.sizing import (
    GPU,
    SHAPES,
    SYSTEM_PODS_CPU,
    SYSTEM_PODS_GIB,
    PodShape,
    cpu,
    gib,
    job_shape,
    training_machines,
)
from k8s_tasks.states import describe_termination, terminations, waiting
from k8s_tasks.tools import REPO
from k8s_tasks.validate import K8S_MINORS

SECRET = "mlflow-config"
POOL = "cloud.google.com/gke-nodepool"
MACHINE = "node.kubernetes.io/instance-type"
ACCELERATOR = "cloud.google.com/gke-accelerator"
SPOT = "cloud.google.com/gke-spot"
PREEMPTIBLE = "cloud.google.com/gke-preemptible"
REGION = "topology.kubernetes.io/region"
# DaemonSets in kube-system that enforce NetworkPolicies: GKE Dataplane V2 runs Cilium as anetd
# (`kubectl -n kube-system get pods -l k8s-app=cilium` lists anetd-* pods); GKE's older enforcement is Calico.
ENFORCERS = {"anetd": "GKE Dataplane V2 (anetd)", "cilium": "Cilium", "calico-node": "Calico"}
PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")
START_FAILURES = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")
GET_CREDENTIALS = "`gcloud container clusters get-credentials CLUSTER --location=LOCATION --project=$PROJECT_ID`"
PROBE_TIMEOUT = 600.0


@dataclasses.dataclass(frozen=True)
class Pool:
    """The nodes of one node pool that match the training pod's nodeSelector, and what one of them offers."""

    name: str
    nodes: list[Any]
    machine: str
    spot: str  # "Spot", "preemptible" or "on-demand"
    region: str | None

    def describe(self) -> str:
        node = self.nodes[0]
        alloc = node.status.allocatable or {}
        accelerator = (node.metadata.labels or {}).get(ACCELERATOR)
        gpus = f", {alloc.get(GPU, '0')} x {accelerator or 'GPU'}"
        return (f"pool {self.name}: {len(self.nodes)} node(s) {self.machine}, {self.spot}; allocatable "
                f"{cpu(alloc.get('cpu', '0')):.1f} CPU, {gib(alloc.get('memory', '0')):.1f} GiB{gpus}")


def run_doctor(env: str, *, connect: Callable[[], Cluster], out: TextIO, probe: bool = True,
               timeout: float = PROBE_TIMEOUT, pace: Pace | None = None, now: datetime | None = None,
               root: Path = REPO, environ: Mapping[str, str] | None = None) -> list[Check]:
    """Run every check, print each as it is known, and return them (the relayed probe checks included)."""
    found: list[Check] = []
    print(f"doctor: overlays/{env}, namespace {NAMESPACE}", file=out, flush=True)

    def report(check: Check, indent: str = "") -> None:
        found.append(check)
        print("\n".join(check.lines(indent)), file=out, flush=True)

    for check in _checks(env, connect, probe, timeout, pace or Pace(), now or datetime.now(UTC), root, environ,
                         report):
        report(check)
    problems = sum(c.status == "fail" for c in found)
    unknown = sum(c.status == "unknown" for c in found)
    verdict = (f"{problems} problem(s) to fix (✗ above)" if problems
               else f"everything overlays/{env} needs is in place")
    print(f"doctor: {verdict}" + (f"; {unknown} line(s) marked ? could not be decided here" if unknown else ""),
          file=out, flush=True)
    return found


def _checks(env: str, connect: Callable[[], Cluster], probe: bool, timeout: float, pace: Pace, now: datetime,
            root: Path, environ: Mapping[str, str] | None, report: Callable[..., None]) -> Iterator[Check]:
    problem = kubeconfig_problem(root, environ)
    if problem:
        yield Check("fail", "kube context", problem, f"connect kubectl to your cluster: {GET_CREDENTIALS}")
        return
    try:
        cluster = connect()
    except Exit as exc:
        yield Check("fail", "kube context", exc.message, f"connect kubectl to your cluster: {GET_CREDENTIALS}")
        return
    yield Check("ok", "kube context", cluster.context)
    version = api_check(cluster)
    yield version
    if version.status == "fail":
        yield Check("unknown", "other checks", "skipped: they all need the API server")
        return
    job = one(render_overlay(env, root=root), "Job", "train")
    nodes_check, pool = _safely("GPU nodes", lambda: gpu_nodes_check(env, job, cluster), None)
    yield nodes_check
    yield _safely("network policies", lambda: (network_policy_check(cluster), None), None)[0]
    namespaced = [_safely(title, lambda check=check: (check(cluster, env), None), None)[0] for title, check in (
        (f"namespace {NAMESPACE}", namespace_check), (f"Secret {SECRET}", secret_check),
        ("storage claim", lambda c, e: storage_check(c, e, job)))]
    yield from namespaced
    template_check, template = _safely("deployed configuration", lambda: configuration_check(cluster, env, root),
                                       None)
    yield template_check
    if not probe:
        yield Check("unknown", "probe pod", "not started (--no-probe): storage, model, data and MLflow unchecked")
    elif any(c.status == "fail" for c in [*namespaced, template_check]) or template is None:
        yield Check("unknown", "probe pod", "not started: the namespace, Secret, storage and configuration above "
                    "must pass first")
    else:
        manifest = probe_pod(template, probe_name(now), deadline_seconds=int(timeout))
        head, relayed = run_probe(cluster, env, manifest, timeout, pace)
        yield head
        for check in relayed:
            report(check, "  ")
    yield cost_check(env, job, pool)


def _safely(title: str, check: Callable[[], tuple[Check, Any]], fallback: Any) -> tuple[Check, Any]:
    """A check's result, or its line when the API server stopped answering halfway (never a traceback)."""
    try:
        return check()
    except Exit as exc:
        return Check("fail", title, exc.message, "run the doctor again once the API server answers"), fallback


def api_check(cluster: Cluster) -> Check:
    minimum, newest = (tuple(int(x) for x in minor.split(".")) for minor in (K8S_MINORS[0], K8S_MINORS[-1]))
    try:
        major, minor, version = cluster.server_version()
    except ApiDenied as exc:
        return Check("fail", "API server", f"answers, but refused this user ({exc.status} {exc.reason})",
                     f"log in again: `gcloud auth login`, then {GET_CREDENTIALS}")
    except (ApiUnreachable, Exit) as exc:
        return Check("fail", "API server", exc.message, "check the address in your kubeconfig and the network path "
                     f"to it (VPN, a private cluster's authorized networks), then {GET_CREDENTIALS}")
    if (major, minor) < minimum:
        return Check("fail", "API server", f"Kubernetes {version}: older than {K8S_MINORS[0]}, the first with "
                     "podFailurePolicy GA, which the Jobs rely on",
                     f"upgrade the control plane: `gcloud container clusters upgrade CLUSTER --master "
                     f"--cluster-version={K8S_MINORS[0]}` (then the node pools)")
    newer = f" (newer than {K8S_MINORS[-1]}, the newest the renders are validated against)" if (
        (major, minor) > newest) else ""
    return Check("ok", "API server", f"Kubernetes {version}{newer}")


def _tolerated(tolerations: list[dict[str, Any]], taint: Any) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") and toleration["effect"] != taint.effect:
            continue
        operator = toleration.get("operator", "Equal")
        if not toleration.get("key"):
            if operator == "Exists":
                return True
            continue
        if toleration["key"] == taint.key and (operator == "Exists" or
                                               toleration.get("value", "") == (taint.value or "")):
            return True
    return False


def node_problems(node: Any, shape: PodShape, tolerations: list[dict[str, Any]]) -> list[str]:
    """Why the training pod cannot run on this node; empty when it can (on an otherwise empty node)."""
    problems = []
    ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
    if not ready or ready[0].status != "True":
        problems.append("not Ready")
    if node.spec.unschedulable:
        problems.append("cordoned (unschedulable)")
    for taint in node.spec.taints or []:
        if taint.effect in ("NoSchedule", "NoExecute") and not _tolerated(tolerations, taint):
            problems.append(f"tainted {taint.key}={taint.value or ''}:{taint.effect}, which the pod does not "
                            "tolerate")
    alloc = node.status.allocatable or {}
    gpus = int(alloc.get(GPU, "0"))
    if gpus < shape.gpus:
        problems.append(f"{gpus} allocatable {GPU} for {shape.gpus} requested" + (
            " (no GPU driver: create the pool with --accelerator=...,gpu-driver-version=default, or the device "
            "plugin is not ready yet)" if gpus == 0 else ""))
    cores, memory = cpu(alloc.get("cpu", "0")) - SYSTEM_PODS_CPU, gib(alloc.get("memory", "0")) - SYSTEM_PODS_GIB
    if cores < shape.cpu or memory < shape.memory_gib:
        problems.append(f"{cores:.1f} CPU and {memory:.1f} GiB left after GKE's own pods (assumed {SYSTEM_PODS_CPU} "
                        f"CPU, {SYSTEM_PODS_GIB:g} GiB) for {shape.cpu:g} CPU and {shape.memory_gib:g} GiB requested")
    return problems


def _pools(nodes: list[Any]) -> list[Pool]:
    grouped: dict[str, list[Any]] = {}
    for node in nodes:
        labels = node.metadata.labels or {}
        grouped.setdefault(labels.get(POOL, node.metadata.name), []).append(node)
    pools = []
    for name, members in sorted(grouped.items()):
        labels = members[0].metadata.labels or {}
        spot = "Spot" if labels.get(SPOT) == "true" else "preemptible" if labels.get(PREEMPTIBLE) == "true" \
            else "on-demand"
        pools.append(Pool(name, members, labels.get(MACHINE, "unknown machine type"), spot, labels.get(REGION)))
    return pools


def pool_command(env: str) -> str:
    """The gcloud command that adds the overlay's training pool (README: Quickstart)."""
    shape = SHAPES[training_machines(env)[0]]
    return (f"`gcloud container node-pools create gpu-{shape.gpu.removeprefix('nvidia-')} --cluster=CLUSTER "
            "--location=ZONE "
            f"--machine-type={shape.name} --accelerator=type={shape.gpu},count={shape.gpus},"
            "gpu-driver-version=default --node-labels=nvidia.com/gpu=true --num-nodes=1 --enable-autoscaling "
            "--min-nodes=0 --max-nodes=1` (add --spot for Spot VMs)")


def gpu_nodes_check(env: str, job: dict[str, Any], cluster: Cluster) -> tuple[Check, Pool | None]:
    """Nodes for the training pod: matching its nodeSelector, fitting its requests; the pool that fits."""
    spec = job["spec"]["template"]["spec"]
    selector = spec.get("nodeSelector") or {}
    wanted = ", ".join(f"{k}={v}" for k, v in selector.items()) or "(no nodeSelector)"
    shape = job_shape(job)
    machines = " or ".join(SHAPES[m].describe() for m in training_machines(env))
    try:
        nodes = cluster.nodes()
    except ApiDenied as exc:
        return Check("fail", "GPU nodes", f"cannot list the cluster's nodes ({exc.status} {exc.reason})",
                     "nodes are cluster-wide: ask your cluster admin for `list` on nodes (a ClusterRole), or run "
                     "the doctor as one; `kubectl auth can-i list nodes` tells"), None
    matching = [n for n in nodes if all((n.metadata.labels or {}).get(k) == v for k, v in selector.items())]
    if not matching:
        pools = ", ".join(p.name for p in _pools(nodes)) or "none"
        return Check("fail", "GPU nodes", f"no node carries {wanted}, the training pod's nodeSelector (pools now: "
                     f"{pools}); GKE does not add nvidia.com/gpu=true by itself",
                     f"add a pool of {machines}: {pool_command(env)}. A pool that autoscales from 0 shows no node "
                     "until a pod needs one: if yours does, `gcloud container node-pools list --cluster=CLUSTER` "
                     "shows it, and this line is expected"), None
    pools = _pools(matching)
    fitting = [p for p in pools if any(not node_problems(n, shape, spec.get("tolerations") or [])
                                       for n in p.nodes)]
    if not fitting:
        reasons = "; ".join(f"{p.name}: {', '.join(node_problems(p.nodes[0], shape, spec.get('tolerations') or []))}"
                            for p in pools)
        return Check("fail", "GPU nodes", f"nodes carry {wanted} but none can run the training pod "
                     f"({shape.describe()}): {reasons}",
                     f"the overlay is sized for {machines}: {pool_command(env)}; or change the overlay's "
                     "patches/job-train.sizing.yaml"), None
    pool = fitting[0]
    count = sum(1 for n in pool.nodes if not node_problems(n, shape, spec.get("tolerations") or []))
    extra = f"; {', '.join(p.name for p in fitting[1:])} fit too" if len(fitting) > 1 else ""
    detail = f"{pool.describe()}: the training pod ({shape.describe()}) fits{extra}"
    if count < shape.pods:
        return Check("unknown", "GPU nodes", f"{detail}; the Job runs {shape.pods} pods at once and {count} such "
                     "node(s) are up: the rest must come from the pool's autoscaler (its maximum must allow it)",
                     ), pool
    return Check("ok", "GPU nodes", detail), pool


def network_policy_check(cluster: Cluster) -> Check:
    try:
        daemon_sets = cluster.daemon_sets("kube-system")
    except ApiDenied as exc:
        return Check("fail", "network policies", f"cannot read kube-system's DaemonSets to tell whether policies are "
                     f"enforced ({exc.status} {exc.reason})", "ask for `list` on DaemonSets in kube-system "
                     "(`kubectl auth can-i list daemonsets -n kube-system`)")
    names = {d.metadata.name for d in daemon_sets}
    labels = {(d.metadata.labels or {}).get("k8s-app") for d in daemon_sets}
    for name, what in ENFORCERS.items():
        if name in names or name in labels:
            return Check("ok", "network policies", f"enforced by {what}")
    return Check("unknown", "network policies", "no enforcement found (no anetd, cilium or calico-node DaemonSet in "
                 "kube-system): the NetworkPolicies are accepted but inert, every pod may connect anywhere",
                 "GKE: create the cluster with --enable-dataplane-v2 (it cannot be turned on later), or turn on "
                 "GKE's network policy enforcement: `gcloud container clusters update CLUSTER "
                 "--update-addons=NetworkPolicy=ENABLED`, then `--enable-network-policy`")


def _deploy_fix(env: str) -> str:
    return f"`invoke deploy --env={env}` (README: Quickstart)"


def namespace_check(cluster: Cluster, env: str) -> Check:
    title = f"namespace {NAMESPACE}"
    try:
        namespace = cluster.get("Namespace", NAMESPACE)
    except ApiDenied as exc:
        return Check("fail", title, f"cannot read it ({exc.status} {exc.reason})",
                     f"ask for read access to namespace {NAMESPACE}")
    if namespace is None:
        return Check("fail", title, "not found", _deploy_fix(env))
    enforce = (namespace.metadata.labels or {}).get("pod-security.kubernetes.io/enforce")
    if enforce != "restricted":
        return Check("unknown", title, f"exists, but Pod Security is {enforce or 'not'} enforced (restricted "
                     "expected)", f"{_deploy_fix(env)} labels it")
    return Check("ok", title, "exists, Pod Security \"restricted\" enforced")


def secret_check(cluster: Cluster, env: str) -> Check:
    title = f"Secret {SECRET}"
    try:
        secret = cluster.get("Secret", SECRET)
    except ApiDenied as exc:
        return Check("fail", title, f"cannot read it ({exc.status} {exc.reason})",
                     f"ask for read access to Secrets in namespace {NAMESPACE}")
    if secret is None:
        return Check("fail", title, "not found",
                     f"`invoke deploy --env={env} --mlflow-env FILE` (FILE: a filled-in copy of "
                     f"overlays/{env}/mlflow.env.example)")
    uri = base64.b64decode((secret.data or {}).get("MLFLOW_TRACKING_URI", "")).decode(errors="replace")
    return Check("ok", title, "exists, MLFLOW_TRACKING_URI " + ("set (the probe checks it)" if uri else
                                                               "empty (training needs TRACKING=none then)"))


def _claim_of(job: dict[str, Any]) -> str:
    return next(v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
                if "persistentVolumeClaim" in v)


def _volume_source(volume: Any) -> str:
    if volume.spec.nfs is not None:
        return f"NFS {volume.spec.nfs.server}:{volume.spec.nfs.path}"
    if volume.spec.csi is not None:
        attributes = volume.spec.csi.volume_attributes or {}
        if "ip" in attributes:
            return f"{volume.spec.csi.driver} {attributes['ip']}:/{attributes.get('volume', '')}"
        return volume.spec.csi.driver
    return "another volume type"


def _last_warning(cluster: Cluster, kind: str, name: str) -> str:
    try:
        warnings = [e for e in cluster.events(kind, name) if e.type == "Warning"]
    except (ApiDenied, ApiUnreachable):
        return ""
    return f"{warnings[-1].reason}: {warnings[-1].message}" if warnings else ""


def storage_check(cluster: Cluster, env: str, job: dict[str, Any]) -> Check:
    claim_name = _claim_of(job)
    title = f"storage claim {claim_name}"
    try:
        claim = cluster.get("PersistentVolumeClaim", claim_name)
    except ApiDenied as exc:
        return Check("fail", title, f"cannot read it ({exc.status} {exc.reason})",
                     f"ask for read access to namespace {NAMESPACE}")
    if claim is None:
        return Check("fail", title, "not found", _deploy_fix(env))
    phase, volume_name = claim.status.phase, claim.spec.volume_name
    if phase == "Bound":
        try:
            volume = cluster.get("PersistentVolume", volume_name)
        except ApiDenied as exc:
            return Check("ok", title, f"Bound to {volume_name} (its source is not readable here: {exc.status})")
        source = _volume_source(volume) if volume is not None else "source unknown"
        capacity = (claim.status.capacity or {}).get("storage", "?")
        return Check("ok", title, f"Bound to {volume_name} ({source}, {capacity}, "
                     f"{', '.join(claim.status.access_modes or [])})")
    if phase == "Lost":
        return Check("fail", title, f"Lost: its volume {volume_name} is gone",
                     f"re-create the volume: {_deploy_fix(env)}; for Filestore (components/filestore) delete the "
                     f"claim first (`kubectl delete pvc -n {NAMESPACE} {claim_name}`): a new instance is empty")
    return _pending_claim(cluster, env, claim, title)


def _pending_claim(cluster: Cluster, env: str, claim: Any, title: str) -> Check:
    """Why a Pending claim is bound to no volume, and what binds it."""
    volume_name, name = claim.spec.volume_name, claim.metadata.name
    event = _last_warning(cluster, "PersistentVolumeClaim", name)
    if not volume_name:  # dynamic provisioning (components/filestore)
        if event:
            return Check("fail", title, f"Pending, bound to no volume: {event}",
                         "Filestore needs the cluster's CSI driver (`gcloud container clusters update CLUSTER "
                         "--update-addons=GcpFilestoreCsiDriver=ENABLED`) and at least the tier's minimum size "
                         "(components/filestore)")
        return Check("unknown", title, f"Pending: waiting for storage class {claim.spec.storage_class_name} to "
                     "provision a volume (Filestore takes several minutes)", "run the doctor again in a few minutes")
    try:
        volume = cluster.get("PersistentVolume", volume_name)
    except ApiDenied as exc:
        return Check("fail", title, f"Pending, bound to no volume; its volume {volume_name} is not readable here "
                     f"({exc.status} {exc.reason})", f"`kubectl describe pvc -n {NAMESPACE} {name}` tells why")
    if volume is None:
        return Check("fail", title, f"Pending, bound to no volume: its PersistentVolume {volume_name} does not "
                     "exist", _deploy_fix(env))
    ref = volume.spec.claim_ref
    if volume.status.phase == "Released" or (ref is not None and ref.uid and ref.uid != claim.metadata.uid):
        return Check("fail", title, f"Pending, bound to no volume: {volume_name} is {volume.status.phase}, still "
                     "reserved for an earlier claim of that name (deleted with its namespace?); Retain kept it and "
                     "its data",
                     f"release it for the new claim: `kubectl patch pv {volume_name} --type=json "
                     "-p='[{\"op\": \"remove\", \"path\": \"/spec/claimRef/uid\"}]'`")
    if ref is not None and (ref.namespace, ref.name) != (claim.metadata.namespace, name):
        return Check("fail", title, f"Pending, bound to no volume: {volume_name} is reserved for "
                     f"{ref.namespace}/{ref.name}", "point the overlay's PersistentVolume at an export of its own")
    return Check("fail", title, f"Pending, bound to no volume {volume_name}" + (f": {event}" if event else ""),
                 f"`kubectl describe pvc -n {NAMESPACE} {name}` and `kubectl describe pv {volume_name}` tell why")


def configuration_check(cluster: Cluster, env: str, root: Path) -> tuple[Check, dict[str, Any] | None]:
    title = "deployed configuration"
    try:
        template, identity, _ = deployed_template(env, "train", cluster, root=root)
    except ApiDenied as exc:
        return Check("fail", title, f"cannot list ConfigMaps ({exc.status} {exc.reason})",
                     f"ask for read access to namespace {NAMESPACE}"), None
    except Exit as exc:
        # choose_identity's message: what is wrong, the differing keys (one a line), then how to deploy.
        first, *keys = exc.message.splitlines()
        detail = first if not keys else f"{first} {'; '.join(k.strip() for k in keys[:-1])}"
        return Check("fail", title, detail, _deploy_fix(env)), None
    return Check("ok", title, f"{identity.name}, image {identity.image}"), template


def image_pull_fix(image: str, message: str) -> str:
    ref = ImageRef.parse(image)
    host, _, path = ref.repository.partition("/")
    if "not found" in message.lower() or "manifest unknown" in message.lower():
        return f"{image} is not in the registry: `invoke build push`, then `invoke deploy` with that tag"
    if host.endswith("-docker.pkg.dev") and path.count("/") >= 2:
        region, (project, repository) = host.removesuffix("-docker.pkg.dev"), path.split("/")[:2]
        return ("the nodes' service account needs the Artifact Registry Reader role on the repository: `gcloud "
                f"artifacts repositories add-iam-policy-binding {repository} --location={region} --project={project} "
                "--member=serviceAccount:NODE_SA --role=roles/artifactregistry.reader` (NODE_SA: the node pool's "
                "service account, by default PROJECT_NUMBER-compute@developer.gserviceaccount.com)")
    return "the nodes must be allowed to pull from that registry (imagePullSecrets, or the nodes' credentials)"


def run_probe(cluster: Cluster, env: str, manifest: dict[str, Any], timeout: float,
              pace: Pace) -> tuple[Check, list[Check]]:
    """Create the probe pod, follow it until it ends, fails to start or times out; always delete it."""
    name = manifest["metadata"]["name"]
    title = f"probe pod {name}"
    try:
        cluster.create_pod(manifest)
    except ApiDenied as exc:
        return Check("fail", title, f"cannot create pods ({exc.status} {exc.reason})",
                     f"ask for `create`, `get`, `delete` on pods and `get` on pods/log in namespace {NAMESPACE}"), []
    except ApiUnreachable as exc:
        return Check("fail", title, f"not created: {exc.message}", "run the doctor again once the API server "
                     "answers"), []
    except Exit as exc:
        return Check("fail", title, f"was refused: {exc.message}", "Pod Security admission or a policy of the "
                     "cluster refused the training pod's template: `kubectl get events -n llm-training`"), []
    try:
        head, relayed = _follow_probe(cluster, env, name, timeout, pace)
    except Exit as exc:  # the API server stopped answering, or refused a read, while the pod ran
        head, relayed = Check("fail", title, f"lost sight of it: {exc.message}", "run the doctor again"), []
    finally:
        deleted = _delete(cluster, name)
    return (head if deleted is None else dataclasses.replace(head, status="fail", fix=deleted)), relayed


def _delete(cluster: Cluster, name: str) -> str | None:
    """Delete the probe pod; what to do when that fails (None when it is gone)."""
    try:
        cluster.delete_pod(name)
    except Exit as exc:
        return f"the probe pod could not be deleted ({exc.message}): `kubectl delete pod -n {NAMESPACE} {name}`"
    return None


def _follow_probe(cluster: Cluster, env: str, name: str, timeout: float, pace: Pace) -> tuple[Check, list[Check]]:
    title = f"probe pod {name}"
    deadline = pace.clock() + timeout
    last = ("Pending", "not scheduled yet")
    while True:
        pod = cluster.get("Pod", name)
        if pod is None:
            return Check("fail", title, "disappeared before it finished (deleted or evicted)",
                         "run the doctor again; `kubectl get events -n llm-training` tells who removed it"), []
        if pod.status.phase in ("Succeeded", "Failed"):
            return _finished(cluster, env, pod, title)
        state = waiting(pod)
        if state is not None:
            last = state
            reason, message = state
            image = pod.spec.containers[0].image
            if reason in PULL_FAILURES:
                return Check("fail", title, f"cannot pull the image ({reason}: {message})",
                             image_pull_fix(image, message)), []
            if reason in START_FAILURES:
                return Check("fail", title, f"cannot start its container ({reason}: {message})",
                             f"the pod's ConfigMaps and Secret come from the deploy: {_deploy_fix(env)}"), []
            if reason == "Unschedulable":
                stuck = [e for e in _events(cluster, name) if e.reason == "NotTriggerScaleUp"]
                if stuck:
                    return Check("fail", title, f"no node can run it ({message}; the autoscaler: {stuck[-1].message})",
                                 "the probe needs a node that mounts the storage with a quarter CPU and 1 GiB free: "
                                 "add a CPU pool (README: Quickstart) or free a node"), []
        if pace.clock() >= deadline:
            event = _last_warning(cluster, "Pod", name)
            return Check("fail", title, f"did not finish within {timeout:g}s: {last[0]}"
                         + (f" ({last[1]})" if last[1] else "") + (f"; last warning: {event}" if event else ""),
                         _timeout_fix(last[0], event)), []
        pace.sleep(pace.poll)


def _events(cluster: Cluster, name: str) -> list[Any]:
    try:
        return cluster.events("Pod", name)
    except (ApiDenied, ApiUnreachable):
        return []


def _timeout_fix(reason: str, event: str) -> str:
    if event.startswith("FailedMount"):
        return ("the nodes cannot mount the storage: the NFS server of the PersistentVolume must export that path to "
                "the nodes' addresses and be reachable on TCP 2049 (firewall); `kubectl describe pod` shows the "
                "mount error")
    if reason in ("Unschedulable", "Pending"):
        return ("no node took it in time: a node pool may still be scaling up (run the doctor again), or none fits "
                "a small CPU pod: add a CPU pool (README: Quickstart)")
    return "pass a longer --probe-timeout when the image is still being pulled (~5 GB); `kubectl describe pod` tells"


def _finished(cluster: Cluster, env: str, pod: Any, title: str) -> tuple[Check, list[Check]]:
    name = pod.metadata.name
    try:
        # The pod does not know which overlay it came from: its fixes say `<env>`, the doctor does.
        relayed = [dataclasses.replace(c, fix=c.fix.replace("<env>", env))
                   for c in parse_lines(cluster.pod_log(name, CONTAINER))]
    except Exit as exc:
        relayed = [Check("unknown", "probe output", f"cannot read the pod's log ({exc.message})")]
    where = f"ran on node {pod.spec.node_name or '?'}: the image was pulled and started"
    if pod.status.phase == "Succeeded":
        return Check("ok", title, where), relayed
    ended = [t for t in terminations(pod) if t.exit_code != 0]
    if any(c.status == "fail" for c in relayed):
        return Check("ok", title, f"{where}; it found the problems below"), relayed
    if ended:
        reason, code = describe_termination(ended[-1]), ended[-1].exit_code
    else:
        reason, code = pod.status.reason or "failed", None
    fixes = {78: "the configuration the pods get is refused (the reason above): fix it in the overlay's llm-config "
                 f"literals or mlflow.env, then {_deploy_fix(env)}",
             137: "the probe was killed: out of memory on a busy node? run the doctor again"}
    fix = fixes.get(code, f"pass a longer --probe-timeout when the image pull took the time ({reason})"
                    if reason == "DeadlineExceeded" else "the README's Exit codes explain the code")
    return Check("fail", title, f"{where}, then failed: {reason}", fix), relayed


def cost_check(env: str, job: dict[str, Any], pool: Pool | None) -> Check:
    """What a training Job costs per hour: on the pool found (Spot or not), else on the overlay's machine."""
    shape = job_shape(job)
    price = estimate(pool.machine, shape.pods, pool.region) if pool is not None else None
    if price is not None:
        spot = pool.spot != "on-demand"
        return Check("ok", "cost", f"a training Job ({shape.describe()}) holds {price.describe(spot)}")
    price = estimate(training_machines(env)[0], shape.pods)
    unpriced = f"pool {pool.name}'s {pool.machine} is not in k8s_tasks/prices.py; " if pool is not None else ""
    return Check("ok", "cost", f"{unpriced}on the machine overlays/{env} is sized for, a training Job "
                 f"({shape.describe()}) holds {price.describe()}")
