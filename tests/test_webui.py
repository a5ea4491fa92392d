"""The WebUI launcher for real: LLaMA Board served on the configured port from its storage workdir."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READY_WITHIN_S = 120
STOP_WITHIN_S = 20
LAUNCH = (
    "from entrypoint.webui import run; from entrypoint.settings import load_settings; "
    "raise SystemExit(run(load_settings()))"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def test_webui_serves_llama_board_from_storage_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    storage = tmp_path / "storage"
    (storage / "data").mkdir(parents=True)
    workdir = storage / "webui"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")}
    env.update(
        PYTHONPATH=str(REPO),
        TRACKING="none",
        WEBUI_PORT=str(port),
        WEBUI_WORKDIR=str(workdir),
        BASE_MODEL_PATH=str(storage / "models" / "base-model"),
        LORA_OUTPUT_PATH=str(storage / "output" / "lora-adapter"),
        MERGED_MODEL_PATH=str(storage / "models" / "merged-model"),
        DATASET_PATH=str(storage / "data"),
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        # Would open a public tunnel if it reached Gradio: the launcher must drop it.
        GRADIO_SHARE="true",
    )
    log = tmp_path / "webui.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCH], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + READY_WITHIN_S
            status, page = 0, ""
            while time.monotonic() < deadline and process.poll() is None:
                status, page = _get(f"http://127.0.0.1:{port}/")
                if status == 200:
                    break
                time.sleep(1)
            assert status == 200, (
                f"no LLaMA Board on port {port} within {READY_WITHIN_S} s:\n{log.read_text()}"
            )
            assert "LLaMA Board" in page

            # It works inside WEBUI_WORKDIR (on storage) and offers the datasets of DATASET_PATH.
            assert (workdir / "cache").is_dir(), "LLaMA Board did not write its cache into WEBUI_WORKDIR"
            assert (workdir / "data").resolve() == (storage / "data").resolve()

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=STOP_WITHIN_S) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log.read_text()
    assert "public URL" not in output and "gradio.live" not in output, output
    assert _get(f"http://127.0.0.1:{port}/")[0] == 0, "the server still answers after the launcher exited"


def test_workdir_links_the_datasets_but_keeps_a_data_dir_of_its_own(tmp_path: Path) -> None:
    from entrypoint.settings import load_settings
    from entrypoint.webui import prepare_environment, prepare_workdir

    datasets = tmp_path / "storage" / "data"
    datasets.mkdir(parents=True)
    fresh = load_settings(
        {"TRACKING": "none", "WEBUI_WORKDIR": str(tmp_path / "fresh"), "DATASET_PATH": str(datasets)}
    )
    assert (prepare_workdir(fresh) / "data").resolve() == datasets.resolve()

    own = tmp_path / "own"
    (own / "data").mkdir(parents=True)
    kept = load_settings({"TRACKING": "none", "WEBUI_WORKDIR": str(own), "DATASET_PATH": str(datasets)})
    prepare_workdir(kept)
    assert not (own / "data").is_symlink()

    # From a multi-node overlay's llm-config: LLaMA Board's own torchrun would wait for a second node.
    environ = {"GRADIO_SHARE": "1", "NNODES": "2", "MASTER_ADDR": "", "MASTER_PORT": "29500"}
    prepare_environment(fresh, environ)
    assert environ == {
        "GRADIO_SERVER_NAME": "0.0.0.0",
        "GRADIO_SERVER_PORT": "7860",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
