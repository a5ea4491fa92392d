"""--follow: wait for the Job's pods, stream their logs, end with the Job's result and the MLflow run link.

Each pod of the Job is followed in turn (a retried or preempted run gets a new pod); waiting shows why a
pod does not run yet (no GPU node, image pull). It returns once the Job is Complete or Failed.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from invoke.exceptions import Exit

from k8s_tasks.cluster import Cluster
from k8s_tasks.states import (
    STUCK_REASONS,
    age,
    describe_termination,
    job_end,
    job_outcome,
    started,
    terminations,
    waiting,
)

# The entrypoint's last line names the run: "... complete; MLflow run <id> at <uri>" (credentials redacted).
MLFLOW_RUN = re.compile(r"MLflow run ([0-9A-Za-z_-]+) at (\S+)")


def experiment_of_run(uri: str, run_id: str, timeout: float = 3.0) -> str | None:
    """The run's experiment id from the tracking server's REST API, or None when it cannot be asked from here
    (servers inside the cluster usually cannot)."""
    if not uri.startswith(("http://", "https://")) or "***@" in uri:
        return None
    query = urllib.parse.urlencode({"run_id": run_id})
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/api/2.0/mlflow/runs/get?{query}", timeout=timeout) as resp:
            return str(json.load(resp)["run"]["info"]["experiment_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mlflow_link(uri: str, run_id: str, env: str, experiment: Callable[[str, str], str | None]) -> str:
    experiment_id = experiment(uri, run_id)
    if experiment_id is not None:
        return f"MLflow run: {uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return (f"MLflow run {run_id} on {uri} (the server does not answer from here: `invoke ui mlflow --env={env}`, "
            "then search for the run id)")


def _container(pod: Any) -> str:
    return pod.spec.containers[0].name


def follow_job(
    cluster: Cluster,
    name: str,
    env: str,
    out: TextIO,
    *,
    poll: float = 2.0,
    stuck_after: float = 300.0,
    heartbeat: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    experiment: Callable[[str, str], str | None] = experiment_of_run,
) -> bool:
    """Follow Job `name` to its end; print its result. True when it completed."""
    seen: set[str] = set()
    run: tuple[str, str] | None = None
    last_wait: tuple[str, str] | None = None
    started_at = wait_since = printed_at = clock()
    while True:
        job = cluster.job(name)
        if job is None:
            raise Exit(f"Job {name} is gone (deleted?)")
        pods = sorted(cluster.pods(f"batch.kubernetes.io/job-name={name}"),
                      key=lambda p: p.metadata.creation_timestamp)
        fresh = [p for p in pods if p.metadata.name not in seen]
        pod = next((p for p in fresh if started(p)), None)
        if pod is not None:
            seen.add(pod.metadata.name)
            last_wait = None
            print(f"--- pod {pod.metadata.name} on node {pod.spec.node_name or '?'}", file=out, flush=True)
            for line in cluster.pod_log(pod.metadata.name, _container(pod), follow=True):
                print(line, file=out, flush=True)
                match = MLFLOW_RUN.search(line)
                if match:
                    run = (match.group(1), match.group(2))
            ended = _wait_for_termination(cluster, name, pod.metadata.name, sleep, poll)
            if ended is not None:
                print(f"--- pod {pod.metadata.name}: {describe_termination(ended)}", file=out, flush=True)
            wait_since = clock()
            continue
        outcome = job_outcome(job)
        if outcome is not None:
            break
        pending = fresh[-1] if fresh else None
        if pending is not None:
            state = waiting(pending)
        elif job.spec.suspend:
            state = ("Suspended", "the Job waits to be admitted (a queue such as Kueue holds it)")
        else:
            state = ("NoPod", "the Job controller has not created a pod yet")
        # Print a wait when it changes, and again every `heartbeat` seconds so a long wait shows it is alive.
        if state is not None and (state != last_wait or clock() - printed_at >= heartbeat):
            reason, detail = state
            print(f"... {reason}{': ' + detail if detail else ''} ({int(clock() - started_at)}s)", file=out,
                  flush=True)
            if state != last_wait:
                wait_since = clock()
            last_wait, printed_at = state, clock()
        if pending is not None and state is not None and state[0] in STUCK_REASONS \
                and clock() - wait_since > stuck_after:
            raise Exit(f"pod {pending.metadata.name} cannot start ({state[0]}: {state[1]}); the Job is still there: "
                       f"fix the cause, then `kubectl delete job -n {cluster.namespace} {name}` and start again")
        sleep(poll)

    kind, reason, message = outcome
    if kind == "Complete":
        took = age(job.status.start_time, job_end(job) or job.status.start_time)
        print(f"Job {name} completed in {took}", file=out)
    else:
        print(f"Job {name} failed: {reason}: {message}".rstrip(": "), file=out)
        last = sorted((t for p in pods for t in terminations(p) if t.exit_code != 0),
                      key=lambda t: (t.finished is not None, t.finished))
        if last:
            print(f"last failure: pod {last[-1].pod}: {describe_termination(last[-1])}", file=out)
    if run is not None:
        print(mlflow_link(run[1], run[0], env, experiment), file=out)
    out.flush()
    return kind == "Complete"


def _wait_for_termination(cluster: Cluster, job: str, pod_name: str, sleep: Callable[[float], None],
                          poll: float, attempts: int = 30) -> Any | None:
    """The pod's termination once the kubelet has recorded it (the log stream ends slightly earlier)."""
    for _ in range(attempts):
        pods = [p for p in cluster.pods(f"batch.kubernetes.io/job-name={job}") if p.metadata.name == pod_name]
        if not pods:
            return None
        ended = [t for t in terminations(pods[0]) if t.finished is not None]
        if ended and pods[0].status.phase in ("Succeeded", "Failed"):
            return max(ended, key=lambda t: t.finished)
        sleep(poll)
    return None
