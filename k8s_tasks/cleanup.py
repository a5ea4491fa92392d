"""`invoke cleanup jobs [--all]`: delete finished Jobs (their pods and logs go with them)."""

from __future__ import annotations

from invoke.exceptions import Exit

from k8s_tasks.cluster import Cluster
from k8s_tasks.plan import Command, Plan
from k8s_tasks.states import job_outcome
from k8s_tasks.status import SELECTOR

TARGETS = ("jobs",)


def plan_cleanup(target: str, cluster: Cluster, *, everything: bool = False) -> Plan:
    if target not in TARGETS:
        raise Exit(f"cleanup takes one of {', '.join(TARGETS)}, not {target!r}")
    jobs = sorted(cluster.jobs(SELECTOR), key=lambda j: j.metadata.name)
    chosen = [j.metadata.name for j in jobs if everything or job_outcome(j) is not None]
    notes = []
    running = [j.metadata.name for j in jobs if job_outcome(j) is None]
    if everything and running:
        notes.append(f"--all deletes running Jobs too ({', '.join(running)}): training stops at a checkpoint "
                     "(SIGTERM) and a later run resumes from it")
    elif running:
        notes.append(f"kept, still running: {', '.join(running)} (--all deletes them too)")
    what = "every Job" if everything else "finished Jobs"
    if not chosen:
        return Plan(f"cleanup: no {what} to delete in namespace {cluster.namespace}", [], notes=notes)
    argv = ("kubectl", "delete", "job", "-n", cluster.namespace, *chosen)
    return Plan(f"delete {len(chosen)} {what} in namespace {cluster.namespace} of kube context {cluster.context}",
                [Command(argv)], notes=notes)
