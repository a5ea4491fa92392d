"""The files beside the weights of a published model: what transformers and vLLM read besides the tensors.

- config.json: the base's (a full fine-tune's own), with `tie_word_embeddings: false` when lm_head was
  written on its own (lora_merge._Untie).
- The tokenizer and chat template training used. LLaMA-Factory's templates replace the EOS token (llama3,
  qwen, qwen3, gemma, phi4, ...) and write their chat template into a tokenizer that has none; training saves
  that tokenizer beside the adapter, and `llamafactory-cli export` publishes the same one (with
  padding_side "left" for generation, as here). The base's tokenizer is used only when the adapter
  directory has none (an adapter made elsewhere), with a warning.
- generation_config.json: stops at the trained tokenizer's EOS and at the template's other stop words, as
  well as at the base's own stop ids. transformers' generate() reads only this file; vLLM reads it too.
Anything else of the base (license, README) is copied as is; a full fine-tune's training records are not.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from entrypoint.files import fsync_path, read_json
from entrypoint.model_dir import BaseModel, has_tokenizer, is_tokenizer_file, token_ids

log = logging.getLogger("entrypoint")

GENERATION_CONFIG = "generation_config.json"
# What transformers' Trainer and LLaMA-Factory leave in a training output besides the model.
TRAINING_RECORDS = frozenset({
    "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json", "trainer_log.jsonl",
    "training_loss.png", "training_eval_loss.png", "README.md",
})


def write_companions(base: BaseModel, out_dir: Path, trained: Path, untied: bool,
                     stop_tokens: tuple[str, ...]) -> tuple[str, ...]:
    """Write the non-weight files into out_dir; return their names."""
    tokenizer_dir = trained if has_tokenizer(trained) else base.directory
    if tokenizer_dir != trained:
        log.warning("%s has no tokenizer: publishing the base's, whose EOS may not be the one training used", trained)
    full_finetune = trained == base.directory
    written = []
    for path in base.other_files():
        if is_tokenizer_file(path.name) and tokenizer_dir != base.directory:
            continue
        if full_finetune and path.name in TRAINING_RECORDS:
            continue
        if path.name in ("config.json", GENERATION_CONFIG):
            continue  # written below
        _copy(path, out_dir / path.name)
        written.append(path.name)
    if tokenizer_dir != base.directory:
        for path in sorted(tokenizer_dir.iterdir()):
            if path.is_file() and is_tokenizer_file(path.name):
                _copy(path, out_dir / path.name)
                written.append(path.name)
    _set_padding_side(out_dir / "tokenizer_config.json")
    config = dict(base.config)
    if untied:
        config["tie_word_embeddings"] = False
        _write_json(out_dir / "config.json", config)
    else:
        _copy(base.directory / "config.json", out_dir / "config.json")
    written.append("config.json")
    generation = generation_config(base.directory / GENERATION_CONFIG, config, out_dir, stop_tokens)
    if generation is not None:
        _write_json(out_dir / GENERATION_CONFIG, generation)
        written.append(GENERATION_CONFIG)
    return tuple(sorted(written))


def trained_eos(tokenizer_dir: Path) -> str | None:
    """The EOS token string a saved tokenizer declares (tokenizer_config.json, else special_tokens_map.json)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = (read_json(tokenizer_dir / name) or {}).get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and token:
            return token
    return None


def generation_config(base_file: Path, config: dict[str, Any], tokenizer_dir: Path,
                      stop_tokens: tuple[str, ...]) -> dict[str, Any] | None:
    """The base's generation config whose eos_token_id also holds the trained EOS and stop words; None when
    the base has none and the trained EOS is the config's own."""
    generation = read_json(base_file)
    ids = token_ids(tokenizer_dir)
    stops = [ids[token] for token in (trained_eos(tokenizer_dir), *stop_tokens) if token in ids]
    current = (generation or {}).get("eos_token_id", config.get("eos_token_id"))
    existing = [current] if isinstance(current, int) else [i for i in current or () if isinstance(i, int)]
    eos = list(dict.fromkeys([*stops, *existing]))
    if generation is None and eos == existing:
        return None
    generation = dict(generation or {"_from_model_config": True})
    generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return generation


def _set_padding_side(path: Path) -> None:
    """As `llamafactory-cli export` saves it: padding on the left, what batched generation needs."""
    data = read_json(path)
    if data is not None and data.get("padding_side") != "left":
        data["padding_side"] = "left"
        _write_json(path, data)


def _copy(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)
    fsync_path(dest)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Written as transformers writes its JSON files (indent 2, sorted keys, UTF-8 as is)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
