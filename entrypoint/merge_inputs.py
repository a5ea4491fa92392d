"""What the merge starts from: training's completion marker (waited for when asked) and the identity of
what would be published (the adapter as trained, the base it goes onto, the merge algorithm)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError, TemporaryFailure
from entrypoint.fingerprint import digest
from entrypoint.model_dir import model_identity
from entrypoint.settings import Settings
from entrypoint.storage import read_marker

log = logging.getLogger("entrypoint")

ENGINE = "stream-merge-1"  # part of the fingerprint: a changed merge algorithm publishes anew
WAIT_POLL_SECONDS = 10.0


@dataclass(frozen=True)
class MergeInputs:
    adapter: Path  # the training output: a LoRA adapter, or a full model
    base: Path
    marker: dict[str, Any]  # training's completion marker
    fingerprint: str  # what a published version made from these inputs carries
    identity: dict[str, Any]

    @property
    def full(self) -> bool:
        return self.marker.get("finetuning_type") == "full"

    @property
    def mlflow_run_id(self) -> str | None:
        return self.marker.get("mlflow_run_id")


def wait_for_adapter(settings: Settings) -> dict[str, Any]:
    """The training marker, waiting for it up to ADAPTER_WAIT_SECONDS when configured."""
    adapter = Path(settings.lora_output_path)
    deadline = time.monotonic() + settings.adapter_wait_seconds
    announced = False
    while True:
        marker = read_marker(adapter)
        if marker is not None:
            return marker
        if time.monotonic() >= deadline:
            break
        if not announced:
            log.info("waiting up to %ds for training to complete %s", settings.adapter_wait_seconds, adapter)
            announced = True
        time.sleep(min(WAIT_POLL_SECONDS, max(0.1, deadline - time.monotonic())))
    what = "does not exist" if not adapter.exists() else "has no completion marker (training is unfinished)"
    if settings.adapter_wait_seconds:
        raise TemporaryFailure(f"LORA_OUTPUT_PATH={str(adapter)!r} {what} after waiting "
                               f"{settings.adapter_wait_seconds}s (ADAPTER_WAIT_SECONDS)")
    raise ConfigError(f"LORA_OUTPUT_PATH={str(adapter)!r} {what}: train first (python -m entrypoint train), "
                      "or set ADAPTER_WAIT_SECONDS to wait for a running training")


def read_inputs(settings: Settings, marker: dict[str, Any]) -> MergeInputs:
    """The inputs and their identity, from the marker and the base's files (no tensor is read)."""
    adapter, base = Path(settings.lora_output_path), Path(settings.base_model_path)
    full = marker.get("finetuning_type") == "full"
    if not full and not (base / "config.json").is_file():
        raise ConfigError(f"BASE_MODEL_PATH={str(base)!r} has no config.json: expected the model the adapter "
                          "was trained on")
    identity = {
        "engine": ENGINE,
        "training": marker.get("fingerprint"),
        "finetuning_type": marker.get("finetuning_type"),
        "base": model_identity(base) if not full else {},
    }
    return MergeInputs(adapter, base, marker, digest(identity), identity)
