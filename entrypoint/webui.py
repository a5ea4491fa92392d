"""`python -m entrypoint webui`: LLaMA Board (LLaMA-Factory's WebUI) on WEBUI_PORT inside WEBUI_WORKDIR.

LLaMA Board keeps its state relative to its working directory (saves/, cache/, config/) and lists the
datasets of ./data. The launcher therefore works inside WEBUI_WORKDIR on the shared storage, so what the
UI saves survives restarts, and links data/ to DATASET_PATH when the workdir has none, so the datasets the
Jobs use are the ones offered.

It builds the UI in-process and calls Gradio's launch itself instead of `llamafactory-cli webui`: sharing
is off by argument (not only by the absence of GRADIO_SHARE, which is removed anyway), no browser is
opened, and SIGTERM stops it cleanly: runs started from the UI (child processes) get SIGTERM first, then
the server closes and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

from entrypoint.errors import ConfigError, ExitCode

if TYPE_CHECKING:
    from entrypoint.settings import Settings

log = logging.getLogger("entrypoint.webui")

# Listen on every interface of the pod: the Service and `kubectl port-forward` reach it there.
SERVER_NAME = "0.0.0.0"
# Time runs started from the UI get to stop after SIGTERM; within the pods' 15 s grace period.
CHILD_STOP_SECONDS = 8.0


# The training Job's multi-node topology (llm-config, PET_*): LLaMA Board's runs read the same names when they
# go through torchrun (several GPUs), but the WebUI is one pod, and would wait for nodes that never come.
MULTINODE_VARIABLES = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "PET_NNODES", "PET_NODE_RANK",
                       "PET_MASTER_ADDR", "PET_MASTER_PORT")


def prepare_environment(settings: Settings, environ: MutableMapping[str, str] = os.environ) -> None:
    """The Gradio variables LLaMA-Factory and its child processes read; never a public share link; one node."""
    environ["GRADIO_SERVER_NAME"] = SERVER_NAME
    environ["GRADIO_SERVER_PORT"] = str(settings.webui_port)
    environ.pop("GRADIO_SHARE", None)
    environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for name in MULTINODE_VARIABLES:
        environ.pop(name, None)


def prepare_workdir(settings: Settings) -> Path:
    """Create WEBUI_WORKDIR and point its data/ at DATASET_PATH unless the user made a data/ of their own."""
    workdir = Path(settings.webui_workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        data = workdir / "data"
        if not os.path.lexists(data):
            data.symlink_to(settings.dataset_path, target_is_directory=True)
    except OSError as exc:
        raise ConfigError(f"WEBUI_WORKDIR={str(workdir)!r} cannot be prepared: {exc}") from exc
    return workdir


def run(settings: Settings) -> int:
    """Serve LLaMA Board until SIGTERM or SIGINT; return the exit code."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("%s received: stopping LLaMA Board", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        os.chdir(prepare_workdir(settings))
        prepare_environment(settings)

        from llamafactory.extras.misc import fix_proxy
        from llamafactory.webui.interface import create_ui

        fix_proxy(ipv6_enabled=False)  # what `llamafactory-cli webui` does: localhost bypasses any proxy
        demo = create_ui().queue()
        if stop.is_set():
            return int(ExitCode.OK)
        demo.launch(
            share=False,
            server_name=SERVER_NAME,
            server_port=settings.webui_port,
            inbrowser=False,
            prevent_thread_lock=True,
        )
        log.info("LLaMA Board serves on port %d, working in %s", settings.webui_port, os.getcwd())
        while not stop.wait(1.0):
            pass
        _stop_children(CHILD_STOP_SECONDS)
        demo.close()
        log.info("LLaMA Board stopped")
        return int(ExitCode.OK)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_children(timeout: float) -> None:
    """SIGTERM to every process started from the UI (training, export), SIGKILL to what outlives timeout."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        log.warning("process %d did not stop within %.0f s: killing it", child.pid, timeout)
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue
