"""Checks of a merged model directory before it is published, from JSON files and safetensors headers alone.

The base was loadable (training loaded it), so the merged model is loadable when it has exactly the base's
tensors with the base's shapes and dtypes (plus lm_head when it was untied), consistent shards and index,
the base's model type, and a tokenizer whose EOS and generation stop ids exist. Reading headers costs no
memory and no import of transformers: the check adds seconds to a merge, not minutes and gigabytes.
"""

from __future__ import annotations

from pathlib import Path

from entrypoint.companions import GENERATION_CONFIG, trained_eos
from entrypoint.errors import ConfigError
from entrypoint.files import read_json
from entrypoint.model_dir import OUTPUT_EMBEDDING, BaseModel, has_tokenizer, read_base_model, token_ids


def verify_merged(model_dir: Path, base: BaseModel, untied: bool) -> None:
    """Raise ConfigError (nothing is published) when the merged directory is not what vLLM can serve."""
    problems = []
    try:
        merged = read_base_model(model_dir)
    except ConfigError as exc:
        raise ConfigError(f"the merged model is unreadable: {exc}; nothing was published") from None
    expected = {name: (entry.dtype, entry.shape) for name, (_, entry) in base.tensors.items()}
    if untied:
        source = next(name for name in base.tensors if name.endswith(("embed_tokens.weight", "wte.weight")))
        expected[OUTPUT_EMBEDDING] = expected[source]
    found = {name: (entry.dtype, entry.shape) for name, (_, entry) in merged.tensors.items()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(name for name in set(expected) & set(found) if expected[name] != found[name])
    if missing or extra or wrong:
        problems.append(f"its tensors differ from the base's: missing {missing[:5]}, unexpected {extra[:5]}, "
                        f"other dtype or shape {wrong[:5]}")
    if merged.config.get("model_type") != base.config.get("model_type"):
        problems.append(f"config.json says model_type {merged.config.get('model_type')!r}, the base "
                        f"{base.config.get('model_type')!r}")
    if untied and merged.config.get("tie_word_embeddings", True):
        problems.append("lm_head was written on its own but config.json still ties it to the input embedding")
    problems += _tokenizer_problems(model_dir, merged)
    if problems:
        raise ConfigError("the merged model would not serve as trained: " + "; ".join(problems)
                          + "; nothing was published")


def _tokenizer_problems(model_dir: Path, merged: BaseModel) -> list[str]:
    if not has_tokenizer(model_dir):
        return ["it has no tokenizer (vLLM needs one beside the weights)"]
    ids = token_ids(model_dir)
    if not ids:  # a SentencePiece-only tokenizer: nothing more can be read without loading it
        return []
    problems = []
    eos = trained_eos(model_dir)
    if eos is not None and eos not in ids:
        problems.append(f"its tokenizer's EOS {eos!r} is not in its vocabulary")
    stops = (read_json(model_dir / GENERATION_CONFIG) or {}).get("eos_token_id")
    stops = [stops] if isinstance(stops, int) else list(stops or ())
    vocab = merged.config.get("vocab_size")
    if isinstance(vocab, int) and any(not isinstance(i, int) or not 0 <= i < vocab for i in stops):
        problems.append(f"generation_config.json stops at ids {stops}, outside the vocabulary of {vocab}")
    return problems
