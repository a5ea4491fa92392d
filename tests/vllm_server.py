"""vLLM for the tests: the real CPU build from .venv-vllm (scripts/ensure-vllm.sh, run by ./dev.sh test),
started by entrypoint.local_vllm with the flags users are given.

A test that needs vLLM never skips: vLLM missing, failing to start within the bound, or refusing a request
fails the test with vLLM's own last log lines, and the server's process group is stopped either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import REPO, base_env

from entrypoint.local_vllm import START_TIMEOUT_S, VllmError, VllmServer

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def vllm_env(**extra: str) -> dict[str, str]:
    """The tests' clean environment, without the project on the path (vLLM has its own packages)."""
    env = {k: v for k, v in base_env().items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def start_server(model: Path, flags: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
                 timeout: float = START_TIMEOUT_S) -> VllmServer:
    server = VllmServer(VLLM_PYTHON, model, list(flags), log_path, vllm_env(**(env or {})))
    try:
        return server.start(timeout)
    except VllmError as exc:
        pytest.fail(str(exc), pytrace=False)


@contextmanager
def running(model: Path, flags: Sequence[str], log_path: Path,
            env: Mapping[str, str] | None = None) -> Iterator[VllmServer]:
    server = start_server(model, flags, log_path, env)
    try:
        yield server
    finally:
        server.stop()
