"""Starting a training or merge Job under a unique name, from the overlay's Job template.

The overlay renders each Job as `llama-<component>-<hash>`, the hash of its whole spec and configuration
(components/job-identity, docs/adr/009); its pod reads `llm-config-<hash>` and the identity ConfigMap
`llama-<component>-identity-<hash>` (the config plus IMAGE), which `invoke deploy` applies. `invoke train`
copies that template under a new name and refers to the same ConfigMaps, so it needs no re-deploy; it never
applies configuration itself. Instead it looks for the deployed identity whose configuration equals the
overlay's, and takes the image from it:

- the Job runs only a (configuration, image) pair that deploy applied, so deploy's refusals (prod: no
  dirty build, digest only) hold for every Job, and the WebUI and the Jobs share one configuration;
- an overlay edited since the deploy is refused, with the differing keys, instead of running a
  configuration nobody deployed (or failing later in the pod on a missing ConfigMap).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from invoke.exceptions import Exit

from k8s_tasks.cluster import Cluster, kubeconfig_problem
from k8s_tasks.image import ImageRef
from k8s_tasks.overlays import NAMESPACE, one, render_overlay
from k8s_tasks.plan import Command, Plan
from k8s_tasks.prices import job_estimate
from k8s_tasks.sizing import training_machines
from k8s_tasks.states import QUEUE_LABEL
from k8s_tasks.tools import REPO

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Set by the API server or the Job controller on a live Job: a copy must not carry them.
_SERVER_METADATA = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields", "selfLink",
                    "ownerReferences")
_GENERATED_LABELS = ("controller-uid", "job-name", "batch.kubernetes.io/controller-uid",
                     "batch.kubernetes.io/job-name")
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
TEMPLATE_ANNOTATION = "llama-factory/template"
OVERLAY_ANNOTATION = "llama-factory/overlay"


def default_name(component: str, now: datetime) -> str:
    """The original design's default: llama-train-<YYYYmmdd-HHMMSS> (UTC, so names sort the same for everyone)."""
    return f"llama-{component}-{now.astimezone(UTC):%Y%m%d-%H%M%S}"


def validate_name(name: str) -> str:
    """A Job name that is also a valid label value (its pods carry it): a DNS-1123 label of at most 63."""
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise Exit(f"Job name {name!r} must be at most 63 characters of lowercase letters, digits and '-', "
                   "starting and ending with a letter or digit")
    return name


def job_from_template(template: dict[str, Any], name: str, annotations: dict[str, str]) -> dict[str, Any]:
    """A new Job from a template Job: renamed, without what the API server or the Job controller set."""
    job = copy.deepcopy(template)
    job.pop("status", None)
    meta = job["metadata"]
    meta["name"] = name
    for key in _SERVER_METADATA:
        meta.pop(key, None)
    meta["annotations"] = {k: v for k, v in (meta.get("annotations") or {}).items() if k != _LAST_APPLIED}
    meta["annotations"].update(annotations)
    spec = job["spec"]
    # The controller generates the selector (and its controller-uid label) for the new Job.
    spec.pop("selector", None)
    spec.pop("manualSelector", None)
    for labelled in (meta, spec["template"].get("metadata") or {}):
        labels = labelled.get("labels") or {}
        for key in _GENERATED_LABELS:
            labels.pop(key, None)
    return job


def references(pod_spec: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, name) of every object the pod cannot start without (optional references left out)."""
    if pod_spec.get("serviceAccountName"):
        yield "ServiceAccount", pod_spec["serviceAccountName"]
    if pod_spec.get("subdomain"):
        # A multi-node Job's pods find node 0 through this headless Service: without it rendezvous never happens.
        yield "Service", pod_spec["subdomain"]
    for container in [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]:
        for source in container.get("envFrom", []):
            for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                ref = source.get(key)
                if ref and not ref.get("optional"):
                    yield kind, ref["name"]
        for env in container.get("env", []):
            for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                ref = (env.get("valueFrom") or {}).get(key)
                if ref and not ref.get("optional"):
                    yield kind, ref["name"]
    for volume in pod_spec.get("volumes", []):
        if "configMap" in volume and not volume["configMap"].get("optional"):
            yield "ConfigMap", volume["configMap"]["name"]
        if "secret" in volume and not volume["secret"].get("optional"):
            yield "Secret", volume["secret"]["secretName"]
        if "persistentVolumeClaim" in volume:
            yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]


@dataclasses.dataclass(frozen=True)
class Identity:
    """A deployed identity ConfigMap: the configuration plus the image a Job of that hash runs."""

    name: str
    image: str
    config: dict[str, str]
    created: datetime | None


def deployed_identities(cluster: Cluster, component: str) -> list[Identity]:
    prefix = f"llama-{component}-identity-"
    found = []
    for cm in cluster.config_maps("app.kubernetes.io/name=llama-factory"):
        data = dict(cm.data or {})
        if cm.metadata.name.startswith(prefix) and "IMAGE" in data:
            image = data.pop("IMAGE")
            found.append(Identity(cm.metadata.name, image, data, cm.metadata.creation_timestamp))
    return found


def config_differences(overlay: dict[str, str], deployed: dict[str, str]) -> list[str]:
    """`KEY: overlay X, deployed Y` for each key that differs (ConfigMap values: nothing secret)."""
    unset = "(unset)"
    return [f"{key}: overlay {overlay.get(key, unset)!r}, deployed {deployed.get(key, unset)!r}"
            for key in sorted(set(overlay) | set(deployed)) if overlay.get(key) != deployed.get(key)]


def _newest_first(identities: list[Identity]) -> list[Identity]:
    return sorted(identities, key=lambda i: i.created or datetime.min.replace(tzinfo=UTC), reverse=True)


def _tag_matches(image: str, tag: str) -> bool:
    ref = ImageRef.parse(image)
    return tag in (ref.tag, ref.digest)


def choose_identity(env: str, component: str, config: dict[str, str], identities: list[Identity],
                    tag: str | None = None, webui_image: str | None = None) -> tuple[Identity, list[str]]:
    """The deployed identity to run: same configuration as the overlay; the image from --tag, else the one
    the WebUI runs, else the newest. Returns it with notes for the user."""
    deploy_hint = f"`invoke deploy --env={env}` applies it (it starts no training)"
    if not identities:
        raise Exit(f"nothing is deployed for {component} Jobs in namespace {NAMESPACE}: {deploy_hint}")
    same = _newest_first([i for i in identities if i.config == config])
    if not same:
        newest = _newest_first(identities)[0]
        diff = "\n  ".join(config_differences(config, newest.config))
        raise Exit(f"the configuration of overlays/{env} is not deployed; it differs from the newest deployed one "
                   f"({newest.name}, image {newest.image}) in:\n  {diff}\n{deploy_hint}")
    if tag is not None:
        tagged = [i for i in same if _tag_matches(i.image, tag)]
        if not tagged:
            images = ", ".join(sorted({i.image for i in same}))
            raise Exit(f"no image tagged {tag!r} is deployed with this configuration (deployed: {images}); "
                       f"`invoke deploy --env={env} --tag={tag}` deploys it")
        same = tagged
    preferred = [i for i in same if i.image == webui_image] or same
    chosen = preferred[0]
    notes = []
    others = sorted({i.image for i in same} - {chosen.image})
    if others:
        notes.append(f"image {chosen.image} chosen; also deployed with this configuration: {', '.join(others)} "
                     "(choose with --tag)")
    return chosen, notes


def deployed_template(env: str, component: str, cluster: Cluster, *, tag: str | None = None,
                      root: Path = REPO) -> tuple[dict[str, Any], Identity, list[str]]:
    """The overlay's rendered Job of `component` with the image deployed for its configuration (see the module's
    docstring), the identity it runs, and notes for the user. Refuses what was not deployed."""
    placeholder = render_overlay(env, root=root)
    config_name = _config_map_of(one(placeholder, "Job", component))
    (config,) = [d.get("data") or {} for d in placeholder if d["kind"] == "ConfigMap" and
                 d["metadata"]["name"] == config_name]
    webui = cluster.deployment("llama-webui")
    webui_image = webui.spec.template.spec.containers[0].image if webui is not None else None
    identity, notes = choose_identity(env, component, config, deployed_identities(cluster, component), tag,
                                      webui_image)

    template = one(render_overlay(env, ImageRef.parse(identity.image), root), "Job", component)
    rendered_identity = _identity_of(template)
    if rendered_identity != identity.name:
        # Same configuration and image must give the same kustomize hash: this means another kustomize.
        raise Exit(f"overlays/{env} with image {identity.image} renders identity {rendered_identity}, but the "
                   f"deployed one is {identity.name}: was it deployed with another kustomize version? "
                   f"`invoke deploy --env={env}` re-applies it")
    return template, identity, notes


def plan_start(env: str, component: str, cluster: Cluster, *, now: datetime, name: str | None = None,
               tag: str | None = None, root: Path = REPO, region: str | None = None) -> tuple[Plan, str]:
    """The plan to start one uniquely named Job of `component` from overlays/<env>, and the Job's name.

    A training Job's plan notes its shape and estimated price per hour (`region`'s list prices when the table
    has them: k8s_tasks/prices.py)."""
    template, identity, notes = deployed_template(env, component, cluster, tag=tag, root=root)
    job_name = validate_name(name or default_name(component, now))
    if cluster.job(job_name) is not None:
        raise Exit(f"Job {job_name} already exists in namespace {NAMESPACE}: choose another --name")
    missing = [f"{kind}/{ref}" for kind, ref in dict.fromkeys(references(template["spec"]["template"]["spec"]))
               if not cluster.exists(kind, ref)]
    if missing:
        raise Exit(f"the {component} Job needs objects missing from namespace {NAMESPACE}: {', '.join(missing)}; "
                   f"`invoke deploy --env={env}` creates them")
    if component == "train":
        notes.append(cost_note(env, template, region))

    queue = (template["metadata"].get("labels") or {}).get(QUEUE_LABEL)
    if queue and not cluster.exists("LocalQueue", queue):
        # Kueue's webhook would create the Job suspended, and nothing would ever admit it.
        raise Exit(f"the {component} Job is for Kueue LocalQueue {queue} (KUEUE_QUEUE, components/kueue), which "
                   f"namespace {NAMESPACE} does not have (or Kueue is not installed): it would wait forever. "
                   f"Create the queue (`kubectl apply -k docs/kueue/queue` is an example), or remove components/kueue "
                   f"from overlays/{env}")

    job = job_from_template(template, job_name, {TEMPLATE_ANNOTATION: template["metadata"]["name"],
                                                 OVERLAY_ANNOTATION: env})
    manifest = yaml.safe_dump(job, sort_keys=False)
    title = (f"start {component} Job {job_name} in namespace {NAMESPACE} of kube context {cluster.context}: "
             f"overlays/{env}, configuration {identity.name}, image {identity.image}")
    step = Command(("kubectl", "create", "-f", "-"), manifest, f"Job {job_name} (from {identity.name})")
    return Plan(title, [step], checks=[kubeconfig_problem], notes=notes), job_name


def cost_note(env: str, job: dict[str, Any], region: str | None) -> str:
    """`shape: ...; sized for ...; about $x/h on-demand, $y/h Spot ...`: what a training Job holds and costs."""
    shape, price = job_estimate(env, job, region)
    machines = " or ".join(training_machines(env))
    cost = price.describe() if price is not None else "no list price for it in k8s_tasks/prices.py"
    return f"shape: {shape.describe()}; sized for {machines}; {cost} while it runs"


def _config_map_of(job: dict[str, Any]) -> str:
    """The llm-config ConfigMap the Job's container reads its settings from."""
    for container in job["spec"]["template"]["spec"]["containers"]:
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                return source["configMapRef"]["name"]
    raise Exit(f"Job {job['metadata']['name']} reads no ConfigMap (envFrom configMapRef)")


def _identity_of(job: dict[str, Any]) -> str:
    """The identity ConfigMap the Job's pods read IMAGE from."""
    for container in job["spec"]["template"]["spec"]["containers"]:
        for env in container.get("env", []):
            ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
            if env["name"] == "IMAGE" and ref:
                return ref["name"]
    raise Exit(f"Job {job['metadata']['name']} reads IMAGE from no ConfigMap")


ROLLBACK_VERSION = re.compile(r"^v\d{4,}(-[0-9a-z-]+)?$")


def plan_rollback(env: str, cluster: Cluster, *, now: datetime, to: str | None = None, name: str | None = None,
                  tag: str | None = None, root: Path = REPO) -> tuple[Plan, str]:
    """The plan to start a Job that runs `python -m entrypoint rollback [--to VERSION]`: the merge Job's template
    (its storage, settings, Secret and publish lock), its command replaced, under a llama-rollback-* name."""
    if to is not None and not ROLLBACK_VERSION.fullmatch(to):
        raise Exit(f"--to {to!r}: expected a published version such as v0002 (or its full name, v0002-<fingerprint>)")
    plan, job_name = plan_start(env, "merge", cluster, now=now, name=name or default_name("rollback", now), tag=tag,
                                root=root)
    (step,) = plan.steps
    job = yaml.safe_load(step.stdin)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["python", "-m", "entrypoint", "rollback", *(["--to", to] if to else [])]
    title = plan.title.replace("start merge Job", "start rollback Job", 1) + (
        f", serving {to}" if to else ", serving the version before the current one")
    command = Command(step.argv, yaml.safe_dump(job, sort_keys=False), f"rollback {step.stdin_note}")
    return Plan(title, [command], checks=plan.checks, notes=plan.notes), job_name
