"""Checks of a merged model directory before it is published: what transformers and vLLM will read."""

from __future__ import annotations

from pathlib import Path

from entrypoint.errors import ConfigError


def verify_loadable(model_dir: Path, reference_dir: Path) -> None:
    """Check the result as transformers will load it, without materialising the weights: the config and
    tokenizer load, every parameter of the architecture is present with its shape, special tokens are
    the reference's (a changed EOS makes vLLM never stop generating)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    found: dict[str, tuple[int, ...]] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                found[name] = tuple(fh.get_slice(name).get_shape())
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [n for n in expected if n not in found and not (tied and n.endswith("lm_head.weight"))]
    wrong = [n for n, shape in expected.items() if n in found and found[n] != shape]
    if missing or wrong:
        raise ConfigError(f"the merged model does not match its architecture: missing {missing[:5]}, "
                          f"wrong shape {wrong[:5]}; nothing was published")
    if any(reference_dir.glob("tokenizer*")):
        ours, theirs = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(reference_dir)
        for attr in ("eos_token", "bos_token", "pad_token"):
            if getattr(ours, attr) != getattr(theirs, attr):
                raise ConfigError(f"the merged model's {attr} is {getattr(ours, attr)!r}, the base's is "
                                  f"{getattr(theirs, attr)!r}; nothing was published")
