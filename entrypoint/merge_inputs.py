"""What the merge starts from: training's completion marker (waited for when asked) and the identity of
what would be published: the adapter's own files, the base it goes onto, the merge algorithm. A new adapter
(even one of the same size and configuration) always publishes anew; an adapter trained on other base
weights than the ones at BASE_MODEL_PATH is refused."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError, TemporaryFailure
from entrypoint.fingerprint import digest
from entrypoint.model_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, model_identity, read_base_model
from entrypoint.settings import Settings
from entrypoint.storage import RUN_FILE, read_failure, read_marker, state_dir

log = logging.getLogger("entrypoint")

# Part of the fingerprint: a changed merge algorithm publishes anew. 2: the tokenizer and stop ids training
# used, lora_bias scaled, untied lm_head on tied bases.
ENGINE = "stream-merge-2"
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

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """The chat template's stop words, as training recorded them."""
        return tuple((self.marker.get("template") or {}).get("stop_words") or ())


def wait_for_adapter(settings: Settings) -> dict[str, Any]:
    """The training marker, waiting for it up to ADAPTER_WAIT_SECONDS when configured."""
    adapter = Path(settings.lora_output_path)
    deadline = time.monotonic() + settings.adapter_wait_seconds
    announced = False
    while True:
        marker = read_marker(adapter)
        if marker is not None:
            return marker
        if settings.merge_unmarked_adapter and adapter.is_dir():
            return unmarked_marker(adapter)
        failure = read_failure(adapter)
        if failure is not None:
            raise ConfigError(
                f"the training of LORA_OUTPUT_PATH={str(adapter)!r} failed for good (exit {failure.get('exit_code')}"
                f"{', Job ' + failure['job_name'] if failure.get('job_name') else ''}: {failure.get('message')}); "
                "nothing to merge: fix that and train again, and merge after it")
        if time.monotonic() >= deadline:
            break
        if not announced:
            log.info("waiting up to %ds for training to complete %s", settings.adapter_wait_seconds, adapter)
            announced = True
        time.sleep(min(WAIT_POLL_SECONDS, max(0.1, deadline - time.monotonic())))
    where = f"LORA_OUTPUT_PATH={str(adapter)!r}"
    if not adapter.exists():
        what = f"{where} does not exist"
    elif (state_dir(adapter) / RUN_FILE).is_file():
        what = f"{where} has no completion marker: its training started but has not finished"
    else:
        what = (f"{where} has no completion marker of this tool (an adapter trained elsewhere?); to merge it as it "
                "is, set MERGE_UNMARKED_ADAPTER=true")
    if settings.adapter_wait_seconds:
        raise TemporaryFailure(f"{what}, after waiting {settings.adapter_wait_seconds}s (ADAPTER_WAIT_SECONDS)")
    raise ConfigError(f"{what}. Train first (python -m entrypoint train), or set ADAPTER_WAIT_SECONDS to wait "
                      "for a running training")


def unmarked_marker(adapter: Path) -> dict[str, Any]:
    """What stands in for the marker of an adapter this tool did not train (MERGE_UNMARKED_ADAPTER)."""
    if (adapter / ADAPTER_CONFIG).is_file():
        kind = "lora"
    elif (adapter / "config.json").is_file():
        kind = "full"
    else:
        raise ConfigError(f"LORA_OUTPUT_PATH={str(adapter)!r} holds neither a LoRA adapter ({ADAPTER_CONFIG} + "
                          f"{ADAPTER_WEIGHTS}) nor a full model (config.json): nothing to merge")
    log.warning("merging %s without a completion marker (MERGE_UNMARKED_ADAPTER=true): not checked that training "
                "finished, nor which base it was trained on", adapter)
    return {"fingerprint": None, "finetuning_type": kind, "unmarked": True}


def read_inputs(settings: Settings, marker: dict[str, Any]) -> MergeInputs:
    """The inputs and their identity, from the marker and the files' identities (no tensor is read)."""
    adapter, base = Path(settings.lora_output_path), Path(settings.base_model_path)
    full = marker.get("finetuning_type") == "full"
    if not full and not (base / "config.json").is_file():
        raise ConfigError(f"BASE_MODEL_PATH={str(base)!r} has no config.json: expected the model the adapter "
                          "was trained on")
    base_identity = {}
    if not full:
        read_base_model(base)  # a truncated or inconsistent base says so before any identity is compared
        base_identity = model_identity(base)
        check_same_base(marker, base, base_identity)
    identity = {
        "engine": ENGINE,
        "training": marker.get("fingerprint"),
        "finetuning_type": marker.get("finetuning_type"),
        "adapter": model_identity(adapter),
        "base": base_identity,
    }
    return MergeInputs(adapter, base, marker, digest(identity), identity)


def check_same_base(marker: dict[str, Any], base: Path, identity: dict[str, str]) -> None:
    """The base at BASE_MODEL_PATH must be the one the adapter was trained on: an adapter merged onto other
    weights publishes a model nobody trained."""
    trained_on = (marker.get("inputs") or {}).get("model")
    if not trained_on or trained_on == identity:
        return
    changed = sorted(name for name in set(trained_on) | set(identity) if trained_on.get(name) != identity.get(name))
    raise ConfigError(
        f"BASE_MODEL_PATH={str(base)!r} is not the base the adapter was trained on: {', '.join(changed[:5])} "
        f"differ{'s' if len(changed) == 1 else ''} from the files recorded at training (base identity "
        f"{digest(trained_on)[:12]} then, {digest(identity)[:12]} now). Point BASE_MODEL_PATH at the original "
        "weights, or train again on these"
    )
