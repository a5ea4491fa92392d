"""Read and check a PEFT LoRA adapter: its config, its tensors and what each of them adapts (the base model
directory is model_dir.py's).

Only JSON files and safetensors headers are read here: no tensor data, no torch. That makes every
check cheap enough to run before anything is written, and usable where torch is not installed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError
from entrypoint.files import load_json
from entrypoint.model_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from entrypoint.safetensors_stream import FileHeader, read_header

# PEFT's wrapper around the model: `base_model.model.<module path in the transformers model>`.
PEFT_PREFIX = "base_model.model."
# Module-path components PEFT inserts around a wrapped layer; the base model has neither.
PEFT_WRAPPER_PARTS = ("base_layer", "modules_to_save")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The adapter_config.json fields that decide a merge, as PEFT 0.15.2 reads them."""

    raw: Mapping[str, Any]

    @property
    def r(self) -> int:
        return int(self.raw.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return self.raw.get("lora_alpha", 8)

    @property
    def rank_pattern(self) -> Mapping[str, int]:
        return self.raw.get("rank_pattern") or {}

    @property
    def alpha_pattern(self) -> Mapping[str, float]:
        return self.raw.get("alpha_pattern") or {}

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        return tuple(self.raw.get("modules_to_save") or ())

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """r and alpha of one module (path inside the transformers model, e.g. `model.layers.0.mlp.up_proj`).

        Mirrors peft 0.15.2 LoraModel._create_and_replace: the first pattern key (in file order) that
        matches the end of the module path at a dot boundary wins; keys are regular expressions.
        """
        return (
            int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)),
            self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha),
        )

    def scale(self, module: str) -> float:
        rank, alpha = self.rank_and_alpha(module)
        return alpha / rank**0.5 if self.raw.get("use_rslora") else alpha / rank


def _pattern_key(patterns: Iterable[str], module: str) -> str:
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as exc:
            raise ConfigError(f"adapter_config.json pattern {key!r} is not a valid regex: {exc}") from None
    return module


def read_adapter(directory: Path) -> tuple[AdapterConfig, FileHeader]:
    """The adapter's config and checked weight header; ConfigError when a file is missing or broken."""
    if not directory.is_dir():
        raise ConfigError(f"adapter directory {directory} does not exist")
    if not (directory / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            f"adapter directory {directory} has no {ADAPTER_CONFIG}: expected a PEFT LoRA adapter "
            f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}, as LLaMA-Factory saves it)"
        )
    raw = load_json(directory / ADAPTER_CONFIG, "adapter config")
    if not isinstance(raw, dict):
        raise ConfigError(f"adapter config {directory / ADAPTER_CONFIG} is not a JSON object")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        legacy = directory / "adapter_model.bin"
        hint = (f"; it has {legacy.name}, a pickle file: only safetensors adapters are supported "
                "(save with safe_serialization=True, the PEFT default)") if legacy.is_file() else ""
        raise ConfigError(f"adapter directory {directory} has no {ADAPTER_WEIGHTS}{hint}")
    header = read_header(weights, "adapter weights")
    if not header.entries:
        raise ConfigError(f"adapter weights {weights} hold no tensors")
    return AdapterConfig(raw), header


@dataclasses.dataclass(frozen=True)
class AdapterKey:
    """What one adapter tensor is. `module` is the module path inside the transformers model."""

    key: str
    module: str
    kind: str  # lora_A | lora_B | lora_B.bias | lora_embedding_A | lora_embedding_B | full | unknown
    # For `full` (a trained copy of a base parameter: modules_to_save, bias="all", saved embeddings):
    # the parameter name inside the transformers model.
    parameter: str = ""


_LORA_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_B.bias": "lora_B.bias",
    ".lora_embedding_A": "lora_embedding_A",
    ".lora_embedding_B": "lora_embedding_B",
}


def parse_adapter_key(key: str) -> AdapterKey:
    """Classify a key of adapter_model.safetensors (PEFT has already removed the adapter name)."""
    path = key.removeprefix(PEFT_PREFIX)
    for suffix, kind in _LORA_SUFFIXES.items():
        if path.endswith(suffix):
            return AdapterKey(key, path[: -len(suffix)], kind)
    parts = path.split(".")
    if any(part.startswith("lora_") or part == "token_adapter" for part in parts) or len(parts) < 2:
        return AdapterKey(key, ".".join(parts[:-1]), "unknown")
    kept = [part for part in parts if part not in PEFT_WRAPPER_PARTS]
    return AdapterKey(key, ".".join(kept[:-1]), "full", ".".join(kept))


