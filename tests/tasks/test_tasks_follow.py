"""`train --follow`: logs of each pod in turn, why a pod waits, the Job's result with the exit code's meaning,
and the MLflow run link."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from invoke.exceptions import Exit
from k8s_fake_cluster import FakeCluster
from k8s_task_objects import job, pod, workload

from entrypoint.errors import ExitCode
from k8s_tasks.follow import Pace, experiment_of_run, follow_job
from k8s_tasks.states import EXIT_MEANINGS

NAME = "llama-train-20260102-030405"
RUN_ID = "0123456789abcdef0123456789abcdef"


class _MlflowRuns(BaseHTTPRequestHandler):
    """FAKE of MLflow's REST endpoint runs/get (the only call --follow makes), on 127.0.0.1."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        url = urlsplit(self.path)
        if url.path != "/api/2.0/mlflow/runs/get" or parse_qs(url.query).get("run_id") != [RUN_ID]:
            self.send_error(404)
            return
        body = json.dumps({"run": {"info": {"run_id": RUN_ID, "experiment_id": "7"}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mlflow_uri() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _MlflowRuns)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class Clock:
    """Time for the follower: each sleep moves the fake cluster to its next snapshot."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.now = 0.0
        self.cluster = cluster

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.cluster.advance()

    def __call__(self) -> float:
        return self.now


def follow(cluster: FakeCluster, experiment: Callable[[str, str], str | None] = experiment_of_run,
           **pace: float) -> tuple[bool, str]:
    out = io.StringIO()
    clock = Clock(cluster)
    done = follow_job(cluster, NAME, "dev", out, pace=Pace(sleep=clock.sleep, clock=clock, **pace),
                      experiment=experiment)
    return done, out.getvalue()


def test_every_exit_code_of_the_entrypoint_has_a_meaning() -> None:
    assert set(EXIT_MEANINGS) == set(ExitCode)


def test_a_successful_run_streams_logs_and_ends_with_the_mlflow_link(mlflow_uri: str) -> None:
    running = job(NAME)
    cluster = FakeCluster(
        [running],
        [running, pod(f"{NAME}-a", NAME, phase="Pending", node=None,
                      unschedulable="0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")],
        [running, pod(f"{NAME}-a", NAME)],
        [job(NAME, complete=True, start="2026-01-02T03:04:10Z", end="2026-01-02T03:40:10Z"),
         pod(f"{NAME}-a", NAME, phase="Succeeded", exit_code=0, message="trained")],
        logs={f"{NAME}-a": ["step 1", f"trained: /storage/output/lora-adapter is complete; MLflow run {RUN_ID} "
                                      f"at {mlflow_uri}"]},
    )
    done, text = follow(cluster)
    assert done
    assert "... NoPod: the Job controller has not created a pod yet (0s)" in text
    assert "... Unschedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu. (2s)" in text
    assert f"--- pod {NAME}-a on node gke-gpu-pool-1\nstep 1\n" in text
    assert f"--- pod {NAME}-a: exit 0 (done, or skipped because the same work was already complete): trained" in text
    assert f"Job {NAME} completed in 36m" in text
    assert text.rstrip().endswith(f"MLflow run: {mlflow_uri}/#/experiments/7/runs/{RUN_ID}")


def test_a_failed_run_reports_each_pod_and_the_reason(mlflow_uri: str) -> None:
    running = job(NAME)
    first_failed = pod(f"{NAME}-a", NAME, phase="Failed", exit_code=75, finished="2026-01-02T03:10:00Z",
                       message="exit 75: MLflow at http://mlflow:5000 did not answer within 10 s")
    cluster = FakeCluster(
        [running, pod(f"{NAME}-a", NAME)],
        [running, first_failed],
        [running, first_failed, pod(f"{NAME}-b", NAME, created="2026-01-02T03:10:30Z")],
        [job(NAME, failed="PodFailurePolicy", message="Container train failed with exit code 78"),
         first_failed,
         pod(f"{NAME}-b", NAME, phase="Failed", exit_code=78, created="2026-01-02T03:10:30Z",
             finished="2026-01-02T03:11:00Z", message="exit 78: DATASET 'x' not found in /storage/data")],
        logs={f"{NAME}-a": ["waiting for MLflow"], f"{NAME}-b": ["validating"]},
    )
    done, text = follow(cluster)
    assert not done
    assert f"--- pod {NAME}-a: exit 75 (a dependency was unavailable (MLflow unreachable, output locked): " \
           "retried): MLflow at http://mlflow:5000 did not answer within 10 s" in text
    assert f"--- pod {NAME}-b on node gke-gpu-pool-1\nvalidating\n" in text
    assert f"Job {NAME} failed: PodFailurePolicy: Container train failed with exit code 78" in text
    assert text.rstrip().endswith(f"last failure: pod {NAME}-b: exit 78 (configuration or input error: retrying "
                                  "cannot help, the Job fails at once): DATASET 'x' not found in /storage/data")


def test_a_pod_that_cannot_start_stops_the_follower_with_the_cause() -> None:
    stuck = pod(f"{NAME}-a", NAME, phase="Pending", waiting=("ImagePullBackOff", "Back-off pulling image x:1"))
    cluster = FakeCluster([job(NAME), stuck])
    with pytest.raises(Exit) as raised:
        follow(cluster, stuck_after=60)
    assert f"pod {NAME}-a cannot start (ImagePullBackOff: Back-off pulling image x:1)" in raised.value.message
    assert f"kubectl delete job -n llm-training {NAME}" in raised.value.message


def test_the_run_link_falls_back_to_the_id_when_the_server_does_not_answer() -> None:
    cluster = FakeCluster([job(NAME, complete=True), pod(f"{NAME}-a", NAME, phase="Succeeded", exit_code=0)],
                          logs={f"{NAME}-a": [f"done; MLflow run {RUN_ID} at http://mlflow.mlflow.svc.cluster.local:1"]})
    done, text = follow(cluster, experiment=lambda uri, run: experiment_of_run(uri, run, timeout=0.5))
    assert done
    assert f"MLflow run {RUN_ID} on http://mlflow.mlflow.svc.cluster.local:1 (the server does not answer from " \
           "here: `invoke ui mlflow --env=dev`, then search for the run id)" in text


def test_experiment_lookup_asks_the_rest_api(mlflow_uri: str) -> None:
    assert experiment_of_run(mlflow_uri, RUN_ID) == "7"
    assert experiment_of_run(mlflow_uri, "unknown") is None
    assert experiment_of_run("http://***@mlflow.example.com", RUN_ID) is None  # redacted: not askable


def test_a_long_wait_keeps_reporting() -> None:
    waiting = [job(NAME), pod(f"{NAME}-a", NAME, phase="Pending", node=None,
                              unschedulable="0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")]
    cluster = FakeCluster(*([waiting] * 40), [job(NAME, complete=True)])
    done, text = follow(cluster, heartbeat=30)
    assert done
    waits = [line for line in text.splitlines() if line.startswith("... Unschedulable")]
    assert [w.rsplit("(", 1)[1] for w in waits] == ["0s)", "30s)", "60s)"]


def test_a_job_queued_by_kueue_says_so_with_its_queue_and_kueues_reason() -> None:
    """components/kueue: Kueue's webhook created the Job suspended; it waits for quota, then for the DWS
    ProvisioningRequest of its admission check, then runs."""
    queued = job(NAME, queue="llama-factory", suspend=True, start=None)
    no_quota = workload(NAME, ("QuotaReserved", "False", "Pending", "couldn't assign flavors to pod set main: "
                                "insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 8 more needed"))
    provisioning = workload(NAME, ("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue "
                                   "llama-factory"),
                            ("Admitted", "False", "NoChecks", "The workload has not all checks ready"))
    cluster = FakeCluster(
        [queued],
        [queued, no_quota],
        [queued, provisioning],
        [job(NAME, queue="llama-factory"), pod(f"{NAME}-a", NAME)],
        [job(NAME, queue="llama-factory", complete=True), pod(f"{NAME}-a", NAME, phase="Succeeded", exit_code=0)],
        logs={f"{NAME}-a": ["step 1"]},
    )
    done, text = follow(cluster)
    assert done
    waits = [line for line in text.splitlines() if line.startswith("... ")]
    assert waits == [
        "... queued (suspended by Kueue): queue llama-factory: Kueue has no Workload for it yet (is Kueue installed, "
        "and does its LocalQueue exist?) (0s)",
        "... queued (suspended by Kueue): queue llama-factory: couldn't assign flavors to pod set main: insufficient "
        "unused quota for nvidia.com/gpu in flavor default-flavor, 8 more needed (2s)",
        "... queued (suspended by Kueue): queue llama-factory: The workload has not all checks ready (4s)",
    ]
    assert f"--- pod {NAME}-a on node gke-gpu-pool-1\nstep 1\n" in text


def test_a_job_suspended_by_hand_is_not_called_queued() -> None:
    cluster = FakeCluster([job(NAME, suspend=True, start=None)], [job(NAME, complete=True)])
    done, text = follow(cluster)
    assert done
    assert "... suspended: spec.suspend is true and no Kueue queue holds it: resume it with kubectl patch (0s)" in text
    assert "Kueue)" not in text
