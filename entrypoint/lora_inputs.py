"""Read and check the inputs of a LoRA merge: a base model directory and a PEFT LoRA adapter.

Only JSON files and safetensors headers are read here: no tensor data, no torch. That makes every
check cheap enough to run before anything is written, and usable where torch is not installed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError
from entrypoint.safetensors_stream import FileHeader, TensorEntry, read_header

WEIGHT_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Other weight formats: never copied into a merged model, and refused as a base's only weights.
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "vocab.json")
# PEFT's wrapper around the model: `base_model.model.<module path in the transformers model>`.
PEFT_PREFIX = "base_model.model."
# Module-path components PEFT inserts around a wrapped layer; the base model has neither.
PEFT_WRAPPER_PARTS = ("base_layer", "modules_to_save")


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """A Hugging Face model directory with safetensors weights, headers already checked."""

    directory: Path
    config: Mapping[str, Any]
    index: Mapping[str, Any] | None  # model.safetensors.index.json, None for a single file
    shards: tuple[FileHeader, ...]

    @functools.cached_property
    def tensors(self) -> dict[str, tuple[FileHeader, TensorEntry]]:
        return {entry.name: (shard, entry) for shard in self.shards for entry in shard.entries}

    @functools.cached_property
    def _by_suffix(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for name in self.tensors:
            parts = name.split(".")
            for i in range(1, len(parts) - 1):
                index.setdefault(".".join(parts[i:]), []).append(name)
        return index

    def resolve(self, name: str) -> str | None:
        """The base tensor an adapter's module path + parameter name refers to.

        Checkpoints differ in the model-class prefix: a GPT-2 base saved from GPT2Model stores `h.0...`
        while an adapter trained on GPT2LMHeadModel says `transformer.h.0...`; an adapter trained on a
        bare LlamaModel says `layers.0...` while the base stores `model.layers.0...`. Try the exact
        name, then the name without leading components, then a unique base name ending with it.
        """
        if name in self.tensors:
            return name
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            shorter = ".".join(parts[i:])
            if shorter in self.tensors:
                return shorter
        candidates = self._by_suffix.get(name, [])
        return candidates[0] if len(candidates) == 1 else None

    def other_files(self) -> list[Path]:
        """Top-level files a server needs besides the weights: config, tokenizer, templates.

        Sub-directories (`original/` with a second copy of the weights, hub caches) and files of other
        weight formats are left out: vLLM and transformers read neither.
        """
        skipped = (".safetensors", ".index.json", *OTHER_WEIGHT_SUFFIXES)
        return sorted(
            path for path in self.directory.iterdir()
            if path.is_file() and not path.name.startswith(".") and not path.name.endswith(skipped)
        )


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from None


def read_base_model(directory: Path) -> BaseModel:
    """Find and check a base model's weights; raise ConfigError naming what is wrong."""
    if not directory.is_dir():
        raise ConfigError(f"base model directory {directory} does not exist")
    config = _read_json(directory / "config.json", "base model config")
    index_path = directory / WEIGHT_INDEX
    index: dict[str, Any] | None = None
    if index_path.is_file():
        index = _read_json(index_path, "base model weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"base model weight index {index_path} has no weight_map")
        names = sorted(set(weight_map.values()))
    elif (directory / SINGLE_WEIGHTS).is_file():
        names = [SINGLE_WEIGHTS]
    else:
        others = sorted(p.name for p in directory.iterdir() if p.name.endswith(OTHER_WEIGHT_SUFFIXES))
        found = ", ".join(others) if others else "no weight files at all"
        raise ConfigError(
            f"base model directory {directory} has no safetensors weights ({SINGLE_WEIGHTS} or "
            f"{WEIGHT_INDEX}); found {found}. Only safetensors bases are supported: convert once with "
            "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir), "
            "safetensors being its default"
        )
    shards = tuple(read_header(directory / name, "base model shard") for name in names)
    base = BaseModel(directory, config, index, shards)
    if index is not None:
        _check_index(base, index["weight_map"], index_path)
    return base


def _check_index(base: BaseModel, weight_map: Mapping[str, str], index_path: Path) -> None:
    located = {name: shard.path.name for name, (shard, _) in base.tensors.items()}
    wrong = [name for name, file in weight_map.items() if located.get(name) != file]
    unlisted = [name for name in located if name not in weight_map]
    if wrong or unlisted:
        example = (wrong or unlisted)[0]
        raise ConfigError(
            f"base model weight index {index_path} does not match its shards ({len(wrong)} tensors listed "
            f"in the wrong file or missing, {len(unlisted)} not listed; e.g. {example!r}): the model "
            "directory is incomplete or mixes two models"
        )


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
    raw = _read_json(directory / ADAPTER_CONFIG, "adapter config")
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


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (*TOKENIZER_VOCAB_FILES, "tokenizer.model"))


def tokenizer_tokens(directory: Path) -> set[str] | None:
    """Every token string a tokenizer directory defines, or None when it has no tokenizer files.

    Read from JSON only (tokenizer.json's vocabulary and added tokens, tokenizer_config.json's
    added_tokens_decoder, added_tokens.json, vocab.json), so no tokenizer library is loaded.
    """
    found = [directory / name for name in TOKENIZER_VOCAB_FILES if (directory / name).is_file()]
    if not found:
        return None
    tokens: set[str] = set()
    for path in found:
        data = _read_json(path, "tokenizer file")
        if path.name == "tokenizer.json":
            vocab = (data.get("model") or {}).get("vocab") or {}
            # BPE/WordLevel/WordPiece store {token: id}; Unigram stores [[token, score], ...].
            tokens.update(vocab if isinstance(vocab, dict) else (item[0] for item in vocab))
            tokens.update(item["content"] for item in data.get("added_tokens") or ())
        elif path.name == "tokenizer_config.json":
            tokens.update(item["content"] for item in (data.get("added_tokens_decoder") or {}).values())
        else:
            tokens.update(data)
    return tokens


def added_tokens(adapter_dir: Path, base_dir: Path) -> list[str]:
    """Tokens the adapter's saved tokenizer has and the base's lacks (a resized vocabulary)."""
    adapter_tokens = tokenizer_tokens(adapter_dir)
    base_tokens = tokenizer_tokens(base_dir)
    if adapter_tokens is None or base_tokens is None:
        return []
    return sorted(adapter_tokens - base_tokens)
