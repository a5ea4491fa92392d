"""Helpers for the tests: run the real entrypoint as a subprocess, the way a Job runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from entrypoint.demo import DEMO_ENV

REPO = Path(__file__).resolve().parent.parent
HEAVY_MODULES = ("torch", "transformers", "llamafactory", "mlflow", "peft", "datasets")

TRAIN_ENV = {
    **DEMO_ENV,  # the demo's fast, deterministic settings for the tiny model, with fewer steps
    "MAX_STEPS": "20",
    "SAVE_STEPS": "10",
    "LOGGING_STEPS": "5",
    "MLFLOW_TIMEOUT_SECONDS": "5",
    "LOCK_WAIT_SECONDS": "5",
    "LOG_LEVEL": "INFO",
    # A model trained for a few steps has not learnt to stop, which the publish gate refuses: the tests that
    # check the gate, and those whose models learn (test_gate_e2e, test_vllm_e2e), set it to strict.
    "PUBLISH_GATE": "off",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    """A clean environment: nothing of the developer's shell leaks into the entrypoint's settings."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    return env


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen
    root: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a loaded machine: never leave a server behind
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def start_mlflow(root: Path, port: int | None = None) -> MlflowServer:
    """A real MLflow server on 127.0.0.1 (again on `port`, over the same store, to bring one back after an outage)."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = open(root / "server.log", "a")  # noqa: SIM115 - the server writes to it until stopped
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**base_env(), "PYTHONPATH": ""},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("mlflow server exited: " + (root / "server.log").read_text()[-2000:])
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return MlflowServer(uri, proc, root)
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start within 120 s")


@dataclass
class Storage:
    """A folder laid out like /storage, with the session's tiny model as the base."""

    root: Path
    base: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def output(self) -> Path:
        return self.root / "output" / "lora-adapter"

    def env(self, **overrides: str) -> dict[str, str]:
        env = base_env()
        env.update(TRAIN_ENV)
        env.update(
            BASE_MODEL_PATH=str(self.base),
            LORA_OUTPUT_PATH=str(self.output),
            MERGED_MODEL_PATH=str(self.root / "models" / "merged-model"),
            DATASET_PATH=str(self.data),
            WEBUI_WORKDIR=str(self.root / "webui"),
            TERMINATION_LOG_PATH=str(self.root / "termination-log"),
            TRACKING="none",
        )
        env.update(overrides)
        return env

    def termination_log(self) -> str:
        path = self.root / "termination-log"
        return path.read_text() if path.exists() else ""

    def marker(self) -> dict | None:
        path = self.output / ".job" / "COMPLETE.json"
        return json.loads(path.read_text()) if path.exists() else None


def run_entrypoint(command: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrypoint", command], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def start_entrypoint(command: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")  # noqa: SIM115 - the child writes to it until it exits
    return subprocess.Popen([sys.executable, "-m", "entrypoint", command], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for_steps(output: Path, steps: int, *procs: subprocess.Popen, timeout: float = 240) -> int:
    """Block until trainer_log.jsonl reports at least `steps` steps while every proc runs; return the step."""
    log = output / "trainer_log.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended before reaching the awaited step"
        if log.exists():
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            if lines and lines[-1]["current_steps"] >= steps:
                return lines[-1]["current_steps"]
        time.sleep(0.05)
    raise AssertionError(f"no step {steps} within {timeout}s")


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file below path with its size and mtime: to prove nothing was written."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}

