"""End to end: the real entrypoint, real LLaMA-Factory training on the tiny model, a real MLflow server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    HEAVY_MODULES,
    REPO,
    Storage,
    run_entrypoint,
    snapshot,
    start_entrypoint,
    start_mlflow,
    wait_for_steps,
)

from entrypoint.errors import ExitCode

pytestmark = pytest.mark.e2e

SKIP_PROBE = (
    "import runpy, sys, json\n"
    "sys.argv = ['entrypoint', 'train']\n"
    "try:\n"
    "    runpy.run_module('entrypoint', run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY_MODULES!r} if m in sys.modules]}}))\n"
)


def test_train_marks_complete_tracks_mlflow_and_rerun_skips_without_heavy_imports(storage: Storage, mlflow_server):
    secret_uri = mlflow_server.uri.replace("http://", "http://alice:s3cr3t@")
    env = storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=secret_uri, MLFLOW_EXPERIMENT_NAME="e2e-train",
                      JOB_NAME="llama-train-20261128-000000", POD_NAME="llama-train-x1", IMAGE="img:abc123")
    first = run_entrypoint("train", env)
    assert first.returncode == 0, first.stderr[-3000:]

    marker = storage.marker()
    assert marker and marker["finetuning_type"] == "lora"
    assert (storage.output / "adapter_model.safetensors").stat().st_size > 0
    assert marker["files"]["adapter_model.safetensors"] == (storage.output / "adapter_model.safetensors").stat().st_size
    assert "trained" in storage.termination_log()

    run = mlflow_server.client().get_run(marker["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["LORA_RANK"] == "16" and run.data.params["lf.template"] == "llama3"
    assert all("s3cr3t" not in v for v in run.data.params.values()), "a secret reached MLflow params"
    assert "MLFLOW_TRACKING_URI" not in run.data.params
    assert run.data.tags["job_name"] == "llama-train-20261128-000000"
    assert run.data.tags["pod_name"] == "llama-train-x1" and run.data.tags["image"] == "img:abc123"
    assert run.data.tags["fingerprint"] == marker["fingerprint"]
    losses = mlflow_server.client().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [5, 10, 15, 20]
    assert losses[-1].value < losses[0].value
    artifacts = {a.path for a in mlflow_server.client().list_artifacts(run.info.run_id)}
    assert {"training_loss.png", "trainer_log.jsonl"} <= artifacts
    assert "s3cr3t" not in first.stderr + first.stdout, "a secret reached the logs"

    before = snapshot(storage.output)
    probe = subprocess.run([sys.executable, "-c", SKIP_PROBE], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, probe.stderr
    assert "skipped" in probe.stderr
    assert snapshot(storage.output) == before


def test_sigterm_checkpoints_and_rerun_resumes_in_the_same_mlflow_run(storage: Storage, mlflow_server, tmp_path):
    env = storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=mlflow_server.uri, MLFLOW_EXPERIMENT_NAME="e2e-resume",
                      MAX_STEPS="200", SAVE_STEPS="1000", LOGGING_STEPS="2")
    proc = start_entrypoint("train", env, tmp_path / "first.log")
    seen = wait_for_steps(storage.output, 10, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == ExitCode.INTERRUPTED, (tmp_path / "first.log").read_text()[-3000:]

    checkpoints = sorted(int(p.name.split("-")[1]) for p in storage.output.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and seen <= checkpoints[0] < 200, "the SIGTERM checkpoint is missing"
    assert storage.marker() is None, "an interrupted run must never look complete"
    assert not (storage.output / "adapter_model.safetensors").exists(), "final weights written on SIGTERM"
    run_id = json.loads((storage.output / ".job" / "run.json").read_text())["mlflow_run_id"]
    assert mlflow_server.client().get_run(run_id).info.status == "KILLED"
    assert "exit 143" in storage.termination_log()

    second = run_entrypoint("train", env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from checkpoint-{checkpoints[0]}" in second.stderr
    marker = storage.marker()
    assert marker["mlflow_run_id"] == run_id
    run = mlflow_server.client().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2"
    steps = [m.step for m in mlflow_server.client().get_metric_history(run_id, "loss")]
    assert min(steps) <= checkpoints[0] < max(steps) == 200, "metrics of both attempts belong to one run"
    state = json.loads((storage.output / "trainer_state.json").read_text())
    assert state["global_step"] == 200


def test_second_run_on_the_same_output_waits_then_gives_up_without_harm(storage: Storage, tmp_path):
    env = storage.env(MAX_STEPS="200", SAVE_STEPS="100")
    first = start_entrypoint("train", env, tmp_path / "first.log")
    wait_for_steps(storage.output, 1, first)
    # Frozen, the first run keeps its lock (live process, unexpired) however fast or slow this machine is.
    first.send_signal(signal.SIGSTOP)
    try:
        second = run_entrypoint("train", storage.env(MAX_STEPS="200", SAVE_STEPS="100", LOCK_WAIT_SECONDS="2"))
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == ExitCode.TEMPORARY, second.stderr[-2000:]
    assert "being written by another run" in second.stderr
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert storage.marker() is not None
    third = run_entrypoint("train", env)
    assert third.returncode == 0 and "skipped" in third.stderr


def test_changed_config_is_refused_and_replace_moves_the_old_output_aside(storage: Storage):
    assert run_entrypoint("train", storage.env()).returncode == 0
    before = snapshot(storage.output)

    changed = run_entrypoint("train", storage.env(LORA_RANK="8"))
    assert changed.returncode == ExitCode.CONFIG
    assert "different configuration" in changed.stderr and "lora_rank" in changed.stderr
    assert "REPLACE_OUTPUT" in changed.stderr
    assert snapshot(storage.output) == before, "a refused run changed the output"

    replaced = run_entrypoint("train", storage.env(LORA_RANK="8", REPLACE_OUTPUT="true"))
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    aside = list(storage.output.parent.glob("lora-adapter.replaced-*"))
    assert len(aside) == 1 and snapshot(aside[0]) == before, "the old output must survive, untouched"
    assert json.loads((storage.output / "adapter_config.json").read_text())["r"] == 8


def test_mlflow_dying_mid_run_does_not_lose_the_training(storage: Storage, tmp_path):
    server = start_mlflow(tmp_path / "doomed-mlflow")
    try:
        env = storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=server.uri, MAX_STEPS="200", SAVE_STEPS="100",
                          LOGGING_STEPS="2", MLFLOW_TIMEOUT_SECONDS="2")
        proc = start_entrypoint("train", env, tmp_path / "train.log")
        wait_for_steps(storage.output, 10, proc)
        server.stop(signal.SIGKILL)
        code = proc.wait(timeout=600)
        log = (tmp_path / "train.log").read_text()
        assert code == 0, log[-3000:]
        assert storage.marker() is not None
        assert "MLflow" in log and "dropped" in log, "writes to a dead server must be dropped, not retried"
    finally:
        server.stop(signal.SIGKILL)


def test_dataset_without_dataset_info_is_registered_outside_the_users_data(storage: Storage):
    (storage.data / "dataset_info.json").unlink()
    (storage.data / "train_data.json").rename(storage.data / "chats.json")
    from entrypoint.tinymodel import SHAREGPT_RECORDS

    (storage.data / "chats.json").write_text(json.dumps(SHAREGPT_RECORDS))
    before = snapshot(storage.data)
    result = run_entrypoint("train", storage.env(DATASET="chats"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(storage.data) == before, "the user's data directory was written to"
    generated = json.loads((storage.output / ".job" / "dataset_info" / "dataset_info.json").read_text())
    assert generated["chats"]["formatting"] == "sharegpt"
    assert generated["chats"]["file_name"] == str((storage.data / "chats.json").resolve())


def test_mlflow_unreachable_at_start_fails_fast_with_the_retriable_code(storage: Storage):
    from helpers import free_port

    env = storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}",
                      MLFLOW_TIMEOUT_SECONDS="2")
    t0 = time.monotonic()
    result = run_entrypoint("train", env)
    assert result.returncode == ExitCode.TEMPORARY
    assert "unreachable" in result.stderr and "TRACKING=none" in result.stderr
    assert time.monotonic() - t0 < 60
    assert not storage.output.exists()


def test_interrupted_before_first_checkpoint_restarts_cleanly(storage: Storage, tmp_path: Path):
    env = storage.env(MAX_STEPS="200", SAVE_STEPS="1000", CHECKPOINT_ON_SIGTERM="false")
    proc = start_entrypoint("train", env, tmp_path / "first.log")
    wait_for_steps(storage.output, 5, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == ExitCode.INTERRUPTED
    assert not list(storage.output.glob("checkpoint-*")) and storage.marker() is None
    again = run_entrypoint("train", storage.env(MAX_STEPS="200", SAVE_STEPS="1000"), timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting over" in again.stderr
    assert storage.marker() is not None
