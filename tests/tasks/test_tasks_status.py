"""`invoke status` as the user reads it: Jobs with progress and ETA, pods and why they wait, the WebUI, and
the reason of the last failure."""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import yaml
from k8s_fake_cluster import FakeCluster
from k8s_task_objects import config_map, job, pod, workload

from k8s_tasks.cluster import KubeCluster
from k8s_tasks.status import progress_from_logs, render_status

NOW = datetime(2026, 1, 2, 3, 30, 0, tzinfo=UTC)
RUNNING = "llama-train-20260102-030000"
FAILED = "llama-train-20260101-120000"
TRAINER_LOG = json.dumps({"current_steps": 420, "total_steps": 1000, "loss": 1.2345, "lr": 1e-4, "epoch": 1.26,
                          "percentage": 42.0, "elapsed_time": "0:10:02", "remaining_time": "0:13:51"})
CONFIG = config_map("llm-config-abc", {"LORA_OUTPUT_PATH": "/storage/output/lora-adapter"})
WEBUI = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "llama-webui", "namespace": "llm-training"},
    "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "x"}},
             "template": {"spec": {"containers": [{"name": "webui",
                                                   "image": "eu.gcr.io/p/llama-factory-train:0123456789ab"}]}}},
    "status": {"readyReplicas": 1},
}


def cluster(trainer_log: str = TRAINER_LOG, logs: dict[str, list[str]] | None = None) -> FakeCluster:
    return FakeCluster([
        CONFIG,
        WEBUI,
        job(RUNNING, created="2026-01-02T03:00:00Z", start="2026-01-02T03:00:05Z"),
        pod(f"{RUNNING}-x7k2p", RUNNING),
        job(FAILED, failed="PodFailurePolicy", created="2026-01-01T12:00:00Z", start="2026-01-01T12:00:02Z",
            failed_at="2026-01-01T12:01:02Z",
            message="Container train for pod llm-training/x failed with exit code 78 matching FailJob rule"),
        pod(f"{FAILED}-q2w9e", FAILED, phase="Failed", exit_code=78, finished="2026-01-01T12:01:00Z",
            message="exit 78: LORA_RANK='abc' is not an integer (allowed: an integer >= 1 and <= 1024)"),
        job("llama-merge-20260101-080000", "merge", complete=True, created="2026-01-01T08:00:00Z",
            start="2026-01-01T08:00:02Z", end="2026-01-01T08:04:02Z"),
        pod("llama-webui-5d9c-abcde", None, "webui", component="webui", phase="Pending", node=None,
            unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
    ], trainer_log=trainer_log, logs=logs)


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_running_training_shows_percent_eta_and_loss() -> None:
    text = render_status(cluster(), NOW)
    row = _line(text, RUNNING)
    assert "train" in row
    assert "Running" in row
    assert "42% (420/1000 steps), ETA 0:13:51, loss 1.234" in row
    assert row.split()[-2:] == ["30m", "29m"]  # age, duration


def test_finished_jobs_show_their_outcome() -> None:
    text = render_status(cluster(), NOW)
    failed = _line(text, FAILED)
    assert "Failed: PodFailurePolicy" in failed
    assert failed.split()[-1] == "1m"  # until it was marked Failed
    merge = _line(text, "llama-merge-20260101-080000")
    assert "Complete" in merge
    assert merge.split()[-1] == "4m"


def test_the_last_failure_names_the_exit_code_meaning_and_the_termination_message() -> None:
    text = render_status(cluster(), NOW)
    failure = text.split("LAST FAILURE", 1)[1]
    assert (f"pod {FAILED}-q2w9e (train), 15h29m ago: exit 78 (configuration or input error: retrying cannot "
            "help, the Job fails at once): LORA_RANK='abc' is not an integer") in failure
    assert f"Job {FAILED}: PodFailurePolicy: Container train" in failure


def test_a_pending_pod_says_why_and_the_webui_is_reported() -> None:
    text = render_status(cluster(), NOW)
    pod_row = _line(text, "llama-webui-5d9c-abcde")
    assert "Pending" in pod_row
    assert "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in pod_row
    assert "llama-webui: 1/1 ready, image eu.gcr.io/p/llama-factory-train:0123456789ab" in text


def test_progress_falls_back_to_the_log_when_no_step_is_logged_yet() -> None:
    bar = "\r 41%|####      | 410/1000 [09:50<14:10,  1.44s/it]\r 42%|####      | 420/1000 [10:02<13:51,  1.43s/it]"
    text = render_status(cluster(trainer_log="", logs={f"{RUNNING}-x7k2p": ["loading model", bar]}), NOW)
    assert "42% (420/1000 steps), ETA 13:51" in _line(text, RUNNING)  # tqdm's own format


def test_no_progress_yet_says_so() -> None:
    text = render_status(cluster(trainer_log="", logs={}), NOW)
    assert "starting (no step logged yet)" in _line(text, RUNNING)


def test_log_progress_ignores_unrelated_lines() -> None:
    assert progress_from_logs(["step 3 of my own", "nothing"]) is None
    found = progress_from_logs(["  5%|5         | 5/100 [00:05<?, ?it/s]"])
    assert (found.current, found.total, found.remaining) == (5, 100, None)


def test_a_job_queued_by_kueue_shows_its_queue_and_why() -> None:
    """components/kueue: one Job waits for quota, one was preempted by a higher priority (Kueue suspended it
    again), one was suspended by hand."""
    waiting, preempted, by_hand = "llama-train-20260102-031000", "llama-train-20260102-020000", "llama-merge-x"
    text = render_status(FakeCluster([
        job(waiting, queue="team-a", suspend=True, start=None, created="2026-01-02T03:10:00Z"),
        workload(waiting, ("QuotaReserved", "False", "Pending", "couldn't assign flavors to pod set main: "
                           "insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 1 more needed")),
        job(preempted, queue="team-a", suspend=True, retries=0, created="2026-01-02T02:00:00Z"),
        workload(preempted, ("QuotaReserved", "False", "Pending", ""),
                 ("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: 42) due to "
                  "prioritization in the ClusterQueue")),
        job(by_hand, "merge", suspend=True, start=None),
    ]), NOW)
    status, why = _cells(text, waiting)[2:4]
    assert status == "queued (suspended by Kueue)"
    assert why == ("queue team-a: couldn't assign flavors to pod set main: insufficient unused quota for "
                   "nvidia.com/gpu in flavor default-flavor, 1 more needed")
    assert _cells(text, preempted)[2:4] == [
        "queued (suspended by Kueue)",
        "queue team-a: Preempted to accommodate a workload (UID: 42) due to prioritization in the ClusterQueue"]
    assert _cells(text, by_hand)[2:4] == [
        "suspended", "spec.suspend is true and no Kueue queue holds it: resume it with kubectl patch"]


def _cells(text: str, start: str) -> list[str]:
    """The columns of a table row (separated by two spaces or more)."""
    return re.split(r"\s{2,}", _line(text, start))


def test_an_empty_namespace_says_how_to_start() -> None:
    text = render_status(FakeCluster([]), NOW)
    assert "none: `invoke train --env=...` starts one" in text
    assert "not deployed: `invoke deploy --env=<dev|gpu|prod|multinode> --component webui`" in text


class _ApiServer(BaseHTTPRequestHandler):
    """FAKE Kubernetes API server on 127.0.0.1 (none runs here): the three reads `invoke status` makes of an
    empty namespace but for one finished Job, answered only to the bearer token of the kubeconfig's user."""

    LISTS = {
        "/apis/batch/v1/namespaces/llm-training/jobs": ("JobList", "batch/v1", [
            job("llama-merge-20260101-080000", "merge", complete=True, created="2026-01-01T08:00:00Z",
                start="2026-01-01T08:00:02Z", end="2026-01-01T08:04:02Z")]),
        "/api/v1/namespaces/llm-training/pods": ("PodList", "v1", []),
    }

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        found = self.LISTS.get(self.path.split("?")[0])
        if self.headers.get("Authorization") != "Bearer token-of-the-second-file" or found is None:
            self.send_error(401 if found else 404)
            return
        kind, api_version, items = found
        body = json.dumps({"kind": kind, "apiVersion": api_version, "metadata": {}, "items": items}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_status_reads_the_cluster_of_the_merged_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KubeCluster connects to the current context of the first file that sets one (as kubectl does), with
    the context, cluster and user entries of another file."""
    server = HTTPServer(("127.0.0.1", 0), _ApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    current = tmp_path / "current"
    current.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "lab"}))
    entries = tmp_path / "entries"
    entries.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "elsewhere",
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "me"}},
                     {"name": "elsewhere", "context": {"cluster": "lab", "user": "nobody"}}],
        "clusters": [{"name": "lab", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "me", "user": {"token": "token-of-the-second-file"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(current), str(entries)]))
    try:
        text = render_status(KubeCluster(), NOW)
    finally:
        server.shutdown()
    assert text.startswith("kube context lab, namespace llm-training\n")
    assert "Complete" in _line(text, "llama-merge-20260101-080000")
    assert "not deployed: `invoke deploy" in text  # the WebUI Deployment: 404


KUEUE = "/apis/kueue.x-k8s.io/{version}/namespaces/llm-training/{resource}"


class _KueueApi(BaseHTTPRequestHandler):
    """FAKE Kubernetes API server on 127.0.0.1 with Kueue's CRDs installed: one LocalQueue, one Workload, at the
    versions OBJECTS holds; every other path answers 404, as an API server without that object, without that
    version served, or without Kueue does."""

    OBJECTS: dict[str, dict | None] = {}
    selectors: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path, _, query = self.path.partition("?")
        found = self.OBJECTS.get(path)
        if not found:
            self.send_error(404)
            return
        self.selectors.extend(parse_qs(query).get("labelSelector", []))
        body = json.dumps(found).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_kueue_objects_are_read_through_the_custom_objects_api(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    server = HTTPServer(("127.0.0.1", 0), _KueueApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "me"}}],
        "clusters": [{"name": "lab", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "me", "user": {"token": "t"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(config))
    try:
        cluster = KubeCluster()
        # Kueue 0.20 and later serve v1beta2 only; releases before 0.15 serve v1beta1 only.
        for version in ("v1beta2", "v1beta1"):
            monkeypatch.setattr(_KueueApi, "OBJECTS", {
                KUEUE.format(version=version, resource="localqueues/team-a"): {
                    "apiVersion": f"kueue.x-k8s.io/{version}", "kind": "LocalQueue", "metadata": {"name": "team-a"}},
                KUEUE.format(version=version, resource="workloads"): {
                    "apiVersion": f"kueue.x-k8s.io/{version}", "kind": "WorkloadList", "metadata": {},
                    "items": [workload("llama-train-x", ("QuotaReserved", "False", "Pending", "no quota"))]},
            })
            _KueueApi.selectors.clear()
            assert cluster.exists("LocalQueue", "team-a"), version
            assert not cluster.exists("LocalQueue", "team-b"), version
            (found,) = cluster.workloads("kueue.x-k8s.io/job-uid=uid-llama-train-x")
            assert found["status"]["conditions"][0]["message"] == "no quota"
            assert _KueueApi.selectors == ["kueue.x-k8s.io/job-uid=uid-llama-train-x"]
        monkeypatch.setattr(_KueueApi, "OBJECTS", {})
        assert cluster.workloads("kueue.x-k8s.io/job-uid=x") == []  # no Kueue: 404, nothing queued by it
        assert not cluster.exists("LocalQueue", "team-a")
    finally:
        server.shutdown()
