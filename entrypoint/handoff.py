"""Hand-off to a running vLLM (VLLM_URL): after the merge has published (or found published) a version.

For the adapter, vLLM's runtime LoRA API: POST /v1/load_lora_adapter under a versioned name
(<SERVED_MODEL_NAME>-vNNNN), GET /v1/models to confirm it is served, then POST /v1/unload_lora_adapter for
the previous versions of the same name. vLLM must run with --enable-lora and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True. For the merged model, vLLM reads MERGED_MODEL_PATH only at start: the
step that makes it serve the new version (a restart) is logged. A vLLM that is unreachable (exit 75, the Job
retries and the merge, which skips, hands off again) or refuses the adapter (exit 78) changes nothing that
is published.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError, TemporaryFailure

log = logging.getLogger("entrypoint")

TIMEOUT_S = 120  # loading an adapter reads it from the storage


def hand_off(url: str, api_key: str, served_name: str, version: str, adapter: Path | None, merged_path: str) -> str:
    """Load the adapter of `version` into vLLM at `url` and unload older versions; returns what was done."""
    number = version.split("-", 1)[0]
    log.info("vLLM: to serve %s as a merged model, restart the vLLM that reads %s (it reads the path only at "
             "start; e.g. kubectl rollout restart deployment/<vllm>)", number, merged_path)
    if adapter is None:
        return f"merged model {number} published; restart vLLM to serve it"
    name = f"{served_name}-{number}"
    before = _served(url, api_key)
    if name not in before:
        status, answer = _request(url, api_key, "POST", "/v1/load_lora_adapter",
                                  {"lora_name": name, "lora_path": str(adapter)})
        if status != 200:
            raise ConfigError(f"vLLM at {url} refused to load adapter {adapter} as {name!r} (HTTP {status}: "
                              f"{_message(answer)}); what is published is unchanged")
        if name not in _served(url, api_key):
            raise ConfigError(f"vLLM at {url} accepted adapter {name!r} but /v1/models does not list it")
    previous = sorted(m for m in before if re.fullmatch(re.escape(served_name) + r"-v\d{4,}", m) and m != name)
    for old in previous:
        status, answer = _request(url, api_key, "POST", "/v1/unload_lora_adapter", {"lora_name": old})
        if status != 200:
            log.warning("vLLM: could not unload %s (HTTP %s: %s)", old, status, _message(answer))
    log.info("vLLM at %s serves adapter %s%s", url, name, f"; unloaded {', '.join(previous)}" if previous else "")
    return f"vLLM serves adapter {name}" + (f" (unloaded {', '.join(previous)})" if previous else "")


def _served(url: str, api_key: str) -> list[str]:
    status, answer = _request(url, api_key, "GET", "/v1/models")
    if status != 200 or not isinstance(answer, dict):
        raise ConfigError(f"vLLM at {url} answered GET /v1/models with HTTP {status}: {_message(answer)}")
    return [m.get("id") for m in answer.get("data") or ()]


def _request(url: str, api_key: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url.rstrip("/") + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 (the configured URL)
            raw = response.read().decode(errors="replace")
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read().decode(errors="replace"), exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise TemporaryFailure(f"vLLM at {url} is unreachable ({getattr(exc, 'reason', exc)}); what is "
                               "published is unchanged, and a retry hands it off again") from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


def _message(answer: Any) -> str:
    if isinstance(answer, dict):
        error = answer.get("error")
        text = (error.get("message") if isinstance(error, dict) else error) or answer.get("message") or answer
        return str(text)[:600]
    return str(answer)[:600]
