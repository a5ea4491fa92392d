"""`invoke status`: Jobs, pods and the WebUI, training progress (% and ETA) and the last failure's reason."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from invoke.exceptions import Exit

from k8s_tasks.cluster import Cluster
from k8s_tasks.states import (
    WORKLOAD_JOB_UID_LABEL,
    age,
    describe_termination,
    job_component,
    job_end,
    job_outcome,
    suspended,
    terminations,
    waiting,
)

SELECTOR = "app.kubernetes.io/part-of=llm-training"
WEBUI = "llama-webui"
# tqdm's progress bar as transformers' Trainer prints it: " 42%|####      | 420/1000 [10:02<13:51,  1.43s/it]"
_TQDM = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:]+|\?)")


@dataclasses.dataclass(frozen=True)
class Progress:
    current: int
    total: int
    remaining: str | None  # H:MM:SS as LLaMA-Factory and tqdm print it
    loss: float | None
    source: str  # where it was read: trainer_log.jsonl or the pod's log

    @property
    def percent(self) -> float:
        return 100.0 * self.current / self.total if self.total else 0.0

    def __str__(self) -> str:
        text = f"{self.percent:.0f}% ({self.current}/{self.total} steps)"
        if self.remaining:
            text += f", ETA {self.remaining}"
        if self.loss is not None:
            text += f", loss {self.loss:.4g}"
        return text


def progress_from_trainer_log(line: str) -> Progress | None:
    """One line of LLaMA-Factory's trainer_log.jsonl (written every logging step)."""
    try:
        record = json.loads(line)
        return Progress(int(record["current_steps"]), int(record["total_steps"]), record.get("remaining_time"),
                        record.get("loss"), "trainer_log.jsonl")
    except (ValueError, KeyError, TypeError):
        return None


def progress_from_logs(lines: Iterable[str]) -> Progress | None:
    """The last progress bar in the pod's log: when trainer_log.jsonl cannot be read (no step logged yet)."""
    found = None
    for line in lines:
        # tqdm redraws with carriage returns: the last segment is the latest state.
        for match in _TQDM.finditer(line):
            found = match
    if found is None:
        return None
    remaining = None if found.group(4) == "?" else found.group(4)
    return Progress(int(found.group(1)), int(found.group(2)), remaining, None, "log")


def _env_config_map(pod: Any, container: str) -> str | None:
    for c in pod.spec.containers:
        if c.name == container:
            for source in c.env_from or []:
                if source.config_map_ref is not None:
                    return source.config_map_ref.name
    return None


def train_progress(cluster: Cluster, pod: Any) -> Progress | None:
    """Progress of a running training pod: the last line of its trainer_log.jsonl, else its log's progress bar."""
    config_name = _env_config_map(pod, "train")
    config = cluster.config_map(config_name) if config_name else None
    output = ((config.data or {}) if config is not None else {}).get("LORA_OUTPUT_PATH")
    if output:
        try:
            line = cluster.exec(pod.metadata.name, "train", ["tail", "-n", "1", f"{output}/trainer_log.jsonl"])
        except Exit:
            line = ""
        progress = progress_from_trainer_log(line.strip().splitlines()[-1] if line.strip() else "")
        if progress is not None:
            return progress
    try:
        return progress_from_logs(cluster.pod_log(pod.metadata.name, "train", tail_lines=200))
    except Exit:
        return None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


def _job_status(job: Any, pods: list[Any]) -> str:
    outcome = job_outcome(job)
    if outcome is not None:
        kind, reason, _ = outcome
        return kind if kind == "Complete" else f"Failed: {reason or 'unknown'}"
    text = "Running" if any(p.status.phase == "Running" for p in pods) else "Pending"
    if job.status.failed:
        text += f" (retry {job.status.failed})"
    return text


def _duration(job: Any, now: datetime) -> str:
    start = job.status.start_time
    if start is None:
        return "-"
    return age(start, job_end(job) or now)


def render_status(cluster: Cluster, now: datetime) -> str:
    """The status report as text: what `invoke status` prints."""
    jobs = _newest_first(cluster.jobs(SELECTOR), now)
    pods = _newest_first(cluster.pods(SELECTOR), now)
    lines = [f"kube context {cluster.context}, namespace {cluster.namespace}"]
    for title, section in (("JOBS", jobs_section(cluster, jobs, pods, now)), ("PODS", pods_section(pods, now)),
                           ("WEBUI", webui_section(cluster)), ("LAST FAILURE", failure_section(jobs, pods, now))):
        lines += ["", title, *section]
    return "\n".join(lines)


def _newest_first(objects: list[Any], now: datetime) -> list[Any]:
    return sorted(objects, key=lambda o: o.metadata.creation_timestamp or now, reverse=True)


def jobs_section(cluster: Cluster, jobs: list[Any], pods: list[Any], now: datetime) -> list[str]:
    """One row per Job; a running training shows its progress."""
    pods_of: dict[str, list[Any]] = {}
    for pod in pods:
        owner = (pod.metadata.labels or {}).get("batch.kubernetes.io/job-name")
        if owner:
            pods_of.setdefault(owner, []).append(pod)
    rows = [_job_row(cluster, job, pods_of.get(job.metadata.name, []), now) for job in jobs]
    if not rows:
        return ["  none: `invoke train --env=...` starts one"]
    return _table(["NAME", "TYPE", "STATUS", "PROGRESS", "AGE", "DURATION"], rows)


def _job_row(cluster: Cluster, job: Any, pods: list[Any], now: datetime) -> list[str]:
    status, progress = _job_status(job, pods), "-"
    running = [p for p in pods if p.status.phase == "Running"]
    if job.spec.suspend and job_outcome(job) is None:
        # Queued: why, in place of the progress (Kueue's reason, when a Workload of it says one).
        status, progress = suspended(job, cluster.workloads(f"{WORKLOAD_JOB_UID_LABEL}={job.metadata.uid}"))
    elif job_component(job) == "train" and running and job_outcome(job) is None:
        found = train_progress(cluster, running[0])
        progress = str(found) if found is not None else "starting (no step logged yet)"
    return [job.metadata.name, job_component(job) or "-", status, progress,
            age(job.metadata.creation_timestamp, now), _duration(job, now)]


def pods_section(pods: list[Any], now: datetime) -> list[str]:
    """One row per pod, with why it waits."""
    rows = [_pod_row(pod, now) for pod in pods]
    if not rows:
        return ["  none"]
    return _table(["NAME", "OWNER", "PHASE", "NODE", "RESTARTS", "AGE", "DETAIL"], rows)


def _pod_row(pod: Any, now: datetime) -> list[str]:
    labels = pod.metadata.labels or {}
    owner = labels.get("batch.kubernetes.io/job-name") or labels.get("app.kubernetes.io/component", "-")
    detail = waiting(pod)
    restarts = sum(s.restart_count or 0 for s in pod.status.container_statuses or [])
    return [pod.metadata.name, owner, pod.status.phase or "-", pod.spec.node_name or "-", str(restarts),
            age(pod.metadata.creation_timestamp, now),
            f"{detail[0]}: {detail[1]}".rstrip(": ")[:100] if detail else ""]


def webui_section(cluster: Cluster) -> list[str]:
    """Whether the WebUI is deployed and ready, and how to open it."""
    deployment = cluster.deployment(WEBUI)
    if deployment is None:
        return ["  not deployed: `invoke deploy --env=<dev|gpu|prod|multinode> --component webui`"]
    ready = deployment.status.ready_replicas or 0
    wanted = deployment.spec.replicas if deployment.spec.replicas is not None else 1
    image = deployment.spec.template.spec.containers[0].image
    lines = [f"  {WEBUI}: {ready}/{wanted} ready, image {image}"]
    if ready:
        lines.append("  open it: `invoke ui webui`, then http://localhost:7860")
    return lines


def failure_section(jobs: list[Any], pods: list[Any], now: datetime) -> list[str]:
    """The newest failed container (exit code, meaning, termination message), then up to 3 failed Jobs."""
    failed = [t for pod in pods for t in terminations(pod) if t.exit_code != 0]
    failed.sort(key=lambda t: t.finished or now, reverse=True)
    if failed:
        last = failed[0]
        when = f"{age(last.finished, now)} ago" if last.finished else "earlier"
        lines = [f"  pod {last.pod} ({last.container}), {when}: {describe_termination(last)}"]
    else:
        lines = ["  none"]
    failed_jobs = [(j, job_outcome(j)) for j in jobs if (job_outcome(j) or ("",))[0] == "Failed"]
    for job, outcome in failed_jobs[:3]:
        lines.append(f"  Job {job.metadata.name}: {outcome[1]}: {outcome[2]}".rstrip(": "))
    return lines
