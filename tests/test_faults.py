"""Faults on the tiny model, with real LLaMA-Factory training and a real MLflow server on 127.0.0.1: none of
them may leave an output that a fixed rerun refuses, a torn checkpoint to resume from, a second writer, a
step past MAX_STEPS, a pod killed for overrunning its grace period, an MLflow run left incomplete, or merge
leftovers. (A fake MLflow server appears once, named as such, for an answer a real one cannot give.)"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Storage, run_entrypoint, start_entrypoint, start_mlflow, wait_for_steps

from entrypoint.errors import ExitCode
from entrypoint.outputs import run_results

pytestmark = pytest.mark.e2e


class FakeMlflowThatCannotCreateRuns(http.server.BaseHTTPRequestHandler):
    """A fake MLflow server (a real one cannot be made to fail this way on demand): the start-up check
    passes (the experiment is looked up), then every write, run creation first, answers HTTP 500."""

    def do_GET(self):  # noqa: N802 - the http.server API
        body = json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def broken_mlflow() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeMlflowThatCannotCreateRuns)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_failed_run_creation_does_not_block_the_output(storage: Storage, broken_mlflow: str, mlflow_server):
    """No dataset_info.json: the entrypoint generates one. MLflow failing to create the run (75) must leave
    nothing a retry takes for someone else's files."""
    info = json.loads((storage.data / "dataset_info.json").read_text())
    (storage.data / "dataset_info.json").unlink()
    first = run_entrypoint("train", storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=broken_mlflow,
                                                DATASET=info["train_data"]["file_name"], MAX_STEPS="2"))
    assert first.returncode == ExitCode.TEMPORARY, first.stderr[-2000:]
    assert "could not open the run" in first.stderr
    assert (storage.output / ".job" / "run.json").is_file(), "the run record is the first thing written"

    retry = run_entrypoint("train", storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=mlflow_server.uri,
                                                DATASET=info["train_data"]["file_name"], MAX_STEPS="2"))
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert storage.marker() is not None


def _finish_then_unfinish(storage: Storage, env: dict[str, str]) -> None:
    """A run killed after its last checkpoint: complete it, then take away what the final save wrote."""
    done = run_entrypoint("train", env)
    assert done.returncode == 0, done.stderr[-2000:]
    (storage.output / ".job" / "COMPLETE.json").unlink()
    for name in ("adapter_model.safetensors", "adapter_config.json", "all_results.json", "train_results.json",
                 "trainer_state.json"):
        (storage.output / name).unlink()


def test_a_torn_checkpoint_is_skipped_and_the_previous_one_resumed(storage: Storage):
    env = storage.env(MAX_STEPS="6", SAVE_STEPS="2", SAVE_TOTAL_LIMIT="0")
    _finish_then_unfinish(storage, env)
    optimizer = storage.output / "checkpoint-6" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # trainer_state.json is intact, the optimizer is not
    rerun = run_entrypoint("train", env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from checkpoint-4 (checkpoint-6 incomplete, skipped)" in rerun.stderr
    assert storage.marker()["results"]["global_step"] == 6


def test_resuming_at_the_last_step_finishes_without_training(storage: Storage):
    env = storage.env(MAX_STEPS="4", SAVE_STEPS="2", LOGGING_STEPS="1")
    _finish_then_unfinish(storage, env)
    rerun = run_entrypoint("train", env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "checkpoint-4 is the run's last step: finishing from it without training" in rerun.stderr
    assert not (storage.output / "checkpoint-5").exists()
    results = storage.marker()["results"]
    state = json.loads((storage.output / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert results["global_step"] == 4 and len(losses) == 4
    assert results["train_loss"] == pytest.approx(sum(losses) / 4), "the run's loss, not one step's"
    assert (storage.output / "adapter_model.safetensors").read_bytes() == (
        storage.output / "checkpoint-4" / "adapter_model.safetensors").read_bytes()


def test_a_run_that_lost_its_lock_writes_nothing_more(storage: Storage, tmp_path: Path):
    env = storage.env(MAX_STEPS="400", SAVE_STEPS="1000", LOCK_TTL_SECONDS="10")
    proc = start_entrypoint("train", env, tmp_path / "a.log")
    try:
        wait_for_steps(storage.output, 5, proc)
        lock = storage.output.parent / ".lora-adapter.lock"
        # pod-b took the lock over (as after a network partition made pod-a's heartbeat look dead)
        lock.write_text(json.dumps({"owner": "pod-b:1", "token": "b" * 32, "expires_at": time.time() + 3600}))
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    log = (tmp_path / "a.log").read_text()
    assert code == ExitCode.TEMPORARY, log[-3000:]
    assert "lost the output lock" in log and "pod-b:1" in log
    assert storage.marker() is None and not (storage.output / "adapter_model.safetensors").exists()
    assert json.loads(lock.read_text())["owner"] == "pod-b:1", "the loser never touched the winner's lock"


def test_sigterm_exits_within_the_grace_period_with_mlflow_frozen(storage: Storage, tmp_path: Path):
    server = start_mlflow(tmp_path / "mlflow")
    env = storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=server.uri, MAX_STEPS="400", SAVE_STEPS="1000",
                      LOGGING_STEPS="1", MLFLOW_TIMEOUT_SECONDS="30", TERMINATION_GRACE_SECONDS="15")
    proc = start_entrypoint("train", env, tmp_path / "train.log")
    try:
        wait_for_steps(storage.output, 5, proc)
        os.killpg(server.process.pid, signal.SIGSTOP)  # the server hangs: every write now waits
        time.sleep(1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        os.killpg(server.process.pid, signal.SIGCONT)
        server.stop()
    log = (tmp_path / "train.log").read_text()
    assert code == ExitCode.INTERRUPTED, log[-3000:]
    print(f"SIGTERM to exit with MLflow frozen: {took:.1f}s")
    assert took < 10, f"SIGTERM to exit took {took:.1f}s: a Spot pod would have been killed"
    assert storage.termination_log().startswith("exit 143: SIGTERM: saved checkpoint-")
    checkpoints = sorted(storage.output.glob("checkpoint-*"))
    assert checkpoints and (checkpoints[-1] / ".complete.json").is_file()


def test_an_mlflow_outage_is_repaired_by_the_next_start(storage: Storage, tmp_path: Path):
    server = start_mlflow(tmp_path / "mlflow")
    port = int(server.uri.rsplit(":", 1)[1])
    env = storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=server.uri, MAX_STEPS="30", SAVE_STEPS="10",
                      LOGGING_STEPS="1", MLFLOW_TIMEOUT_SECONDS="10")  # a loaded machine's server is slow, not down
    proc = start_entrypoint("train", env, tmp_path / "train.log")
    try:
        wait_for_steps(storage.output, 3, proc)
        server.stop()  # down for the rest of the run
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    assert code == 0, (tmp_path / "train.log").read_text()[-3000:]
    marker = storage.marker()
    assert marker["mlflow_synced"] is False

    server = start_mlflow(tmp_path / "mlflow", port=port)  # back, over the same store
    try:
        again = run_entrypoint("train", env)
        assert again.returncode == 0 and "skipped" in again.stderr, again.stderr[-2000:]
        run = server.client().get_run(marker["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        steps = sorted({m.step for m in server.client().get_metric_history(run.info.run_id, "loss")})
        assert steps == list(range(1, 31)), "every logged loss point, none twice"
        assert "trainer_log.jsonl" in {a.path for a in server.client().list_artifacts(run.info.run_id)}
        assert storage.marker()["mlflow_synced"] is True
    finally:
        server.stop()


def test_a_skipped_merge_tidies_versions_and_stale_locks(storage: Storage):
    env = storage.env(MAX_STEPS="2", SAVE_STEPS="2")
    assert run_entrypoint("train", env).returncode == 0
    for seed in ("1", "2", "3"):  # three versions, as when kills after the switch left retention undone
        assert run_entrypoint("train", storage.env(REPLACE_OUTPUT="true", SEED=seed, MAX_STEPS="2",
                                                   SAVE_STEPS="2")).returncode == 0
        assert run_entrypoint("merge", storage.env(MERGE_KEEP_VERSIONS="10")).returncode == 0
    versions = storage.root / "models" / "merged-model.versions"
    assert len(list(versions.iterdir())) == 3
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = storage.root / "models" / ".merged-model.lock"
    lock.write_text(json.dumps({"owner": "killed-merge", "token": "t", "expires_at": time.time() + 600,
                                "host": socket.gethostname(), "pid": int(dead.stdout)}))
    (versions / ".tmp-0123456789ab").mkdir()

    skip = run_entrypoint("merge", storage.env(MERGE_KEEP_VERSIONS="2"))
    assert skip.returncode == 0 and "already serves this adapter" in skip.stderr, skip.stderr[-2000:]
    assert sorted(p.name[:5] for p in versions.iterdir()) == ["v0002", "v0003"]
    assert not lock.exists()


def test_a_refused_merge_creates_nothing(storage: Storage):
    assert run_entrypoint("train", storage.env(MAX_STEPS="2", SAVE_STEPS="2")).returncode == 0
    config = json.loads((storage.output / "adapter_config.json").read_text())
    (storage.output / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    result = run_entrypoint("merge", storage.env(MERGE_UNMARKED_ADAPTER="true"))
    assert result.returncode == ExitCode.CONFIG and "DoRA" in result.stderr, result.stderr[-2000:]
    assert not (storage.root / "models" / "merged-model.versions").exists()
    assert not (storage.root / "models" / "merged-model").exists()


def test_killing_the_launcher_kills_its_training_processes(storage: Storage, tmp_path: Path):
    env = storage.env(NPROC_PER_NODE="2", MAX_STEPS="400", SAVE_STEPS="1000")
    proc = start_entrypoint("train", env, tmp_path / "train.log")
    try:
        wait_for_steps(storage.output, 3, proc)
        children = _descendants(proc.pid)
        assert len(children) >= 3, "torchrun and its two ranks"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.2)
        assert not [pid for pid in children if _alive(pid)], "training processes outlived their launcher"
    finally:
        proc.kill()
    rerun = run_entrypoint("train", storage.env(MAX_STEPS="4", SAVE_STEPS="1000"))
    assert rerun.returncode in (0, ExitCode.CONFIG), rerun.stderr[-2000:]  # the lock is free again
    assert "is being written by another run" not in rerun.stderr


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    pairs = list(zip(map(int, out[::2]), map(int, out[1::2]), strict=True))
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [child for child, ppid in pairs if ppid == parent]
        found += kids
        frontier += kids
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def test_run_results_average_every_logged_step(tmp_path: Path):
    state = {"global_step": 6, "log_history": [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0},
                                               {"step": 6, "loss": 1.0}, {"step": 6, "train_loss": 0.1}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "all_results.json").write_text(json.dumps({"train_loss": 0.1, "epoch": 3.0}))
    assert run_results(tmp_path) == {"train_loss": 2.0, "epoch": 3.0, "global_step": 6}

