"""What Jobs and pods are doing, read from the client's models: shared by status, logs and --follow."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from entrypoint.errors import EXIT_MEANINGS, ExitCode

# Waiting reasons that do not go away by waiting: a follower stops on them after a while.
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")


def exit_meaning(code: int) -> str:
    try:
        return EXIT_MEANINGS[ExitCode(code)]
    except ValueError:
        if code == 137:
            return "killed (SIGKILL: out of memory, or not stopped within the grace period)"
        return "not an exit code of the entrypoint"


@dataclasses.dataclass(frozen=True)
class Termination:
    pod: str
    container: str
    exit_code: int
    reason: str
    message: str
    finished: datetime | None


def terminations(pod: Any) -> list[Termination]:
    """Every finished run of a container of the pod (the current state and the previous one)."""
    found = []
    for status in pod.status.container_statuses or []:
        for state in (status.state, status.last_state):
            terminated = state.terminated if state is not None else None
            if terminated is not None:
                found.append(Termination(pod.metadata.name, status.name, terminated.exit_code,
                                         terminated.reason or "", (terminated.message or "").strip(),
                                         terminated.finished_at))
    return found


def waiting(pod: Any) -> tuple[str, str] | None:
    """(reason, message) when the pod is not running yet: unschedulable, pulling, or a container waiting."""
    for condition in pod.status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return condition.reason or "Pending", condition.message or ""
    for status in pod.status.container_statuses or []:
        if status.state is not None and status.state.waiting is not None:
            return status.state.waiting.reason or "Waiting", status.state.waiting.message or ""
    if pod.status.phase == "Pending":
        return "Pending", ""
    return None


def started(pod: Any) -> bool:
    """Whether the pod's logs can be read: a container runs or has run."""
    return any(s.state is not None and (s.state.running or s.state.terminated)
               for s in pod.status.container_statuses or [])


def job_outcome(job: Any) -> tuple[str, str, str] | None:
    """("Complete" | "Failed", reason, message) once the Job is finished, else None."""
    for condition in job.status.conditions or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition.type, condition.reason or "", condition.message or ""
    return None


def job_end(job: Any) -> datetime | None:
    """When the Job finished: its completion time, or when it was marked Failed (failed Jobs have none)."""
    if job.status.completion_time is not None:
        return job.status.completion_time
    for condition in job.status.conditions or []:
        if condition.type == "Failed" and condition.status == "True":
            return condition.last_transition_time
    return None


# Kueue (components/kueue): the label naming a Job's LocalQueue, and the one its Workload carries with the Job's uid.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
WORKLOAD_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"


def queue_of(job: Any) -> str | None:
    return (job.metadata.labels or {}).get(QUEUE_LABEL)


def kueue_reason(workloads: list[dict[str, Any]]) -> str:
    """Why Kueue holds the Job, from its Workload's conditions: preempted, no quota, an admission check
    (a DWS ProvisioningRequest) not ready yet; empty when it says nothing."""
    for workload in workloads:
        conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
        for kind, status in (("Evicted", "True"), ("QuotaReserved", "False"), ("Admitted", "False")):
            condition = conditions.get(kind)
            if condition is not None and condition.get("status") == status and condition.get("message"):
                return str(condition["message"]).strip()
    return ""


def suspended(job: Any, workloads: list[dict[str, Any]]) -> tuple[str, str]:
    """(state, detail) of a suspended Job: queued by Kueue in its queue (with Kueue's reason), or suspended by
    hand. `workloads`: the Kueue Workloads of the Job (none when Kueue has not seen it, or is not installed)."""
    queue = queue_of(job)
    if queue is None:
        return "suspended", "spec.suspend is true and no Kueue queue holds it: resume it with kubectl patch"
    if not workloads:
        return ("queued (suspended by Kueue)", f"queue {queue}: Kueue has no Workload for it yet (is Kueue "
                "installed, and does its LocalQueue exist?)")
    reason = kueue_reason(workloads)
    return "queued (suspended by Kueue)", f"queue {queue}" + (f": {reason}" if reason else "")


def job_component(job: Any) -> str:
    return (job.metadata.labels or {}).get("app.kubernetes.io/component", "")


def describe_termination(t: Termination) -> str:
    text = f"exit {t.exit_code} ({exit_meaning(t.exit_code)})"
    # The entrypoint's termination log starts with the code itself ("exit 78: ..."): say it once.
    message = t.message.removeprefix(f"exit {t.exit_code}: ")
    if message:
        text += f": {message}"
    elif t.reason and t.reason not in ("Error", "Completed"):
        text += f": {t.reason}"
    return text


def age(then: datetime | None, now: datetime) -> str:
    """A short duration such as 45s, 12m, 3h05m, 2d4h."""
    if then is None:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 48:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{hours // 24}d{hours % 24}h"
