"""What a model directory is: the one definition that training, the merge and the vLLM checks share.

A usable base model is a Hugging Face directory with config.json, safetensors weights (one file, or shards
listed by model.safetensors.index.json, every header readable and consistent with the index) and a
tokenizer. Training refuses at start what the merge could not take, so no GPU hour is spent on a base the
publish step would refuse. Only JSON files and safetensors headers are read: no tensor data, no torch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError
from entrypoint.files import load_json
from entrypoint.fingerprint import file_identity
from entrypoint.safetensors_stream import FileHeader, TensorEntry, read_header

WEIGHT_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Other weight formats: never copied into a merged model, and refused as a base's only weights.
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "vocab.json")
# The output layer of a causal LM. Many small models (Qwen2.5 0.5-3B, Llama 3.2, Gemma) store none: their
# config ties it to the input embedding.
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight")
# Module names of the embeddings and the head, as LORA_TARGET or additional_target name them.
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out"})
# Model types whose transformers and vLLM implementations read an lm_head of its own when the config says
# tie_word_embeddings: false (checked in vLLM 0.32's model code; Gemma 2, for one, always ties in vLLM).
# An adapter that changes the embedding or the head of a tied base is published untied for these only.
UNTIE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma3_text")
# Any of these makes a directory hold a tokenizer (SentencePiece models keep their vocabulary in tokenizer.model).
TOKENIZER_FILES = (*TOKENIZER_VOCAB_FILES, "tokenizer.model")
# What a tokenizer's save_pretrained writes besides files named tokenizer*: one set, published together.
TOKENIZER_COMPANION_FILES = frozenset({
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
    "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
})
# Files of a model directory that make up its identity (config, weights, tokenizer, templates).
IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja")

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


def read_base_model(directory: Path) -> BaseModel:
    """Find and check a base model's weights; raise ConfigError naming what is wrong."""
    if not directory.is_dir():
        raise ConfigError(f"base model directory {directory} does not exist")
    config = load_json(directory / "config.json", "base model config")
    index_path = directory / WEIGHT_INDEX
    index: dict[str, Any] | None = None
    if index_path.is_file():
        index = load_json(index_path, "base model weight index")
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


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


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
        data = load_json(path, "tokenizer file")
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


def check_trainable_base(path: Path) -> BaseModel:
    """The base model at BASE_MODEL_PATH, after checking everything training and the merge need of it."""
    where = f"BASE_MODEL_PATH={str(path)!r}"
    if not path.is_dir():
        raise ConfigError(f"{where} does not exist or is not a directory (models must already be on the storage)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{where} has no config.json: expected a Hugging Face model directory")
    base = read_base_model(path)
    if not isinstance(base.config, Mapping) or "model_type" not in base.config:
        raise ConfigError(f"{path / 'config.json'} has no model_type: not a transformers model config")
    if not has_tokenizer(path):
        raise ConfigError(f"{where} holds no tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json)")
    return base


def model_identity(path: Path) -> dict[str, str]:
    """Identity of a model directory: its config, weights and tokenizer files (see fingerprint.file_identity)."""
    return {child.name: file_identity(child) for child in sorted(path.iterdir())
            if child.is_file() and child.suffix in IDENTITY_SUFFIXES}


def tied_input_embedding(base: BaseModel) -> str | None:
    """The input embedding tensor a base also uses as its output layer (it stores no lm_head); else None."""
    if base.resolve(OUTPUT_EMBEDDING) is not None or not base.config.get("tie_word_embeddings", True):
        return None
    names = [name for name in base.tensors if name.endswith(INPUT_EMBEDDING_SUFFIXES)]
    return names[0] if len(names) == 1 else None


def tied_embeddings_problem(model_type: Any) -> str:
    return (
        f"the base ties its output layer to its input embedding (tie_word_embeddings) and the adapter changes "
        f"one of them: the trained model computes them apart, so the merged model must store lm_head on its own, "
        f"which model type {model_type!r} cannot load in vLLM (possible for {', '.join(UNTIE_MODEL_TYPES)}); "
        "train without embed_tokens/lm_head in LORA_TARGET or additional_target"
    )


def is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in TOKENIZER_COMPANION_FILES


def token_ids(directory: Path) -> dict[str, int]:
    """Token string -> id of a saved tokenizer, from its JSON files (a SentencePiece-only tokenizer: {})."""
    ids: dict[str, int] = {}
    tokenizer = directory / "tokenizer.json"
    if tokenizer.is_file():
        data = load_json(tokenizer, "tokenizer file")
        vocab = (data.get("model") or {}).get("vocab") or {}
        # BPE/WordLevel/WordPiece store {token: id}; Unigram stores [[token, score], ...] in id order.
        ids.update(vocab if isinstance(vocab, dict) else {item[0]: i for i, item in enumerate(vocab)})
        ids.update({item["content"]: item["id"] for item in data.get("added_tokens") or ()})
    config = directory / "tokenizer_config.json"
    if config.is_file():
        decoder = load_json(config, "tokenizer file").get("added_tokens_decoder") or {}
        ids.update({item["content"]: int(i) for i, item in decoder.items()})
    return ids
