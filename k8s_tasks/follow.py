"""--follow: wait for the Job's pods, stream their logs, end with the Job's result and the MLflow run link.

Each pod of the Job is followed in turn (a retried or preempted run gets a new pod); waiting shows why a
pod does not run yet (no GPU node, image pull). It returns once the Job is Complete or Failed.
"""

from __future__ import annotations

import dataclasses
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
    WORKLOAD_JOB_UID_LABEL,
    age,
    describe_termination,
    job_end,
    job_outcome,
    started,
    suspended,
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


@dataclasses.dataclass(frozen=True)
class Pace:
    """How the follower waits: how often it looks, how soon a pod that cannot start stops it, how often an
    unchanged wait is repeated (so a long wait shows it is alive). Tests pass a fake sleep and clock."""

    poll: float = 2.0
    stuck_after: float = 300.0
    heartbeat: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic


def follow_job(cluster: Cluster, name: str, env: str, out: TextIO, *, pace: Pace | None = None,
               experiment: Callable[[str, str], str | None] = experiment_of_run) -> bool:
    """Follow Job `name` to its end; print its result. True when it completed."""
    follower = _Follower(cluster, name, out, pace or Pace())
    job, pods, (kind, reason, message) = follower.until_finished()
    lines = _completed(name, job) if kind == "Complete" else _failed(name, reason, message, pods)
    if follower.run is not None:
        run_id, uri = follower.run
        lines.append(mlflow_link(uri, run_id, env, experiment))
    print("\n".join(lines), file=out, flush=True)
    return kind == "Complete"


def waiting_for(cluster: Cluster, job: Any, pending: Any | None) -> tuple[str, str] | None:
    """(reason, detail) of what the Job waits for while no pod of it runs; None when nothing to say."""
    if pending is not None:
        return waiting(pending)
    if job.spec.suspend:
        return suspended(job, cluster.workloads(f"{WORKLOAD_JOB_UID_LABEL}={job.metadata.uid}"))
    return "NoPod", "the Job controller has not created a pod yet"


class _Follower:
    """Following one Job: its pods' logs in turn, the waits in between, until the Job is finished."""

    def __init__(self, cluster: Cluster, name: str, out: TextIO, pace: Pace) -> None:
        self.cluster, self.name, self.out, self.pace = cluster, name, out, pace
        self.streamed: set[str] = set()  # pods whose logs were shown (a retry gets a new pod)
        self.run: tuple[str, str] | None = None  # (run id, tracking URI) from the entrypoint's last line
        self.last_wait: tuple[str, str] | None = None
        self.started_at = self.wait_since = self.printed_at = pace.clock()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def pods(self) -> list[Any]:
        return sorted(self.cluster.pods(f"batch.kubernetes.io/job-name={self.name}"),
                      key=lambda p: p.metadata.creation_timestamp)

    def until_finished(self) -> tuple[Any, list[Any], tuple[str, str, str]]:
        """The finished Job, its pods and its outcome, after streaming every pod that ran."""
        while True:
            job = self.cluster.job(self.name)
            if job is None:
                raise Exit(f"Job {self.name} is gone (deleted?)")
            pods = self.pods()
            fresh = [p for p in pods if p.metadata.name not in self.streamed]
            pod = next((p for p in fresh if started(p)), None)
            if pod is not None:
                self.stream(pod)
                continue
            outcome = job_outcome(job)
            if outcome is not None:
                return job, pods, outcome
            self.report_wait(job, fresh[-1] if fresh else None)
            self.pace.sleep(self.pace.poll)

    def stream(self, pod: Any) -> None:
        """The pod's log to its end, then how its container ended."""
        name = pod.metadata.name
        self.streamed.add(name)
        self.last_wait = None
        self.say(f"--- pod {name} on node {pod.spec.node_name or '?'}")
        for line in self.cluster.pod_log(name, _container(pod), follow=True):
            self.say(line)
            match = MLFLOW_RUN.search(line)
            if match:
                self.run = (match.group(1), match.group(2))
        ended = self.termination(name)
        if ended is not None:
            self.say(f"--- pod {name}: {describe_termination(ended)}")
        self.wait_since = self.pace.clock()

    def termination(self, pod_name: str, attempts: int = 30) -> Any | None:
        """The pod's termination once the kubelet has recorded it (the log stream ends slightly earlier)."""
        for _ in range(attempts):
            pods = [p for p in self.pods() if p.metadata.name == pod_name]
            if not pods:
                return None
            ended = [t for t in terminations(pods[0]) if t.finished is not None]
            if ended and pods[0].status.phase in ("Succeeded", "Failed"):
                return max(ended, key=lambda t: t.finished)
            self.pace.sleep(self.pace.poll)
        return None

    def report_wait(self, job: Any, pending: Any | None) -> None:
        """Print a wait when it changes, and again every `heartbeat` seconds; stop on a pod that cannot start."""
        state = waiting_for(self.cluster, job, pending)
        if state is None:
            return
        now = self.pace.clock()
        if state != self.last_wait or now - self.printed_at >= self.pace.heartbeat:
            reason, detail = state
            self.say(f"... {reason}{': ' + detail if detail else ''} ({int(now - self.started_at)}s)")
            if state != self.last_wait:
                self.wait_since = now
            self.last_wait, self.printed_at = state, now
        if pending is not None and state[0] in STUCK_REASONS and now - self.wait_since > self.pace.stuck_after:
            raise Exit(f"pod {pending.metadata.name} cannot start ({state[0]}: {state[1]}); the Job is still there: "
                       f"fix the cause, then `kubectl delete job -n {self.cluster.namespace} {self.name}` and "
                       "start again")


def _completed(name: str, job: Any) -> list[str]:
    took = age(job.status.start_time, job_end(job) or job.status.start_time)
    return [f"Job {name} completed in {took}"]


def _failed(name: str, reason: str, message: str, pods: list[Any]) -> list[str]:
    """The Job's failure, then the last failed container of its pods (the one that decided it)."""
    lines = [f"Job {name} failed: {reason}: {message}".rstrip(": ")]
    failed = sorted((t for p in pods for t in terminations(p) if t.exit_code != 0),
                    key=lambda t: (t.finished is not None, t.finished))
    if failed:
        lines.append(f"last failure: pod {failed[-1].pod}: {describe_termination(failed[-1])}")
    return lines
