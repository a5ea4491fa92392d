"""`invoke logs`: the log of a Job's (or the WebUI's) newest pod, optionally followed."""

from __future__ import annotations

from typing import Any, TextIO

from invoke.exceptions import Exit

from k8s_tasks.cluster import Cluster
from k8s_tasks.states import started, waiting
from k8s_tasks.status import SELECTOR

COMPONENTS = ("train", "merge", "webui")


def pick_pod(cluster: Cluster, job: str | None, component: str) -> Any:
    """The newest pod of Job `job`, else of the newest Job of `component`, else of the WebUI."""
    if component not in COMPONENTS:
        raise Exit(f"--component must be one of {', '.join(COMPONENTS)}, not {component!r}")
    if job is None and component != "webui":
        jobs = cluster.jobs(f"{SELECTOR},app.kubernetes.io/component={component}")
        if not jobs:
            raise Exit(f"no {component} Job in namespace {cluster.namespace}: `invoke {component} --env=...`")
        job = max(jobs, key=lambda j: j.metadata.creation_timestamp).metadata.name
    selector = f"batch.kubernetes.io/job-name={job}" if job else f"{SELECTOR},app.kubernetes.io/component=webui"
    pods = cluster.pods(selector)
    if not pods:
        raise Exit(f"no pod of {f'Job {job}' if job else 'the WebUI'} yet: `invoke status` shows why")
    return max(pods, key=lambda p: p.metadata.creation_timestamp)


def print_logs(cluster: Cluster, pod: Any, out: TextIO, *, follow: bool, tail: int | None) -> None:
    if not started(pod):
        reason, detail = waiting(pod) or ("Pending", "")
        raise Exit(f"pod {pod.metadata.name} has not started ({reason}{': ' + detail if detail else ''}): "
                   "`invoke status` shows more")
    container = pod.spec.containers[0].name
    print(f"--- pod {pod.metadata.name} ({container})", file=out, flush=True)
    for line in cluster.pod_log(pod.metadata.name, container, follow=follow, tail_lines=tail):
        print(line, file=out, flush=True)
