"""Tiny real models, tokenizers and PEFT adapters for the merge tests, all generated locally.

Nothing is downloaded: models are random-init transformers models, tokenizers are trained here
with the `tokenizers` library, adapters are made by PEFT itself with their B matrices randomised
(PEFT initialises B to zero, which would make every merge a no-op).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

# Words the tokenizer is trained on; its vocabulary stays below the models' 128 rows.
CORPUS = [
    "the merged model answers what it was trained to answer",
    "a lora adapter changes a few matrices of the base model",
    "vllm stops at the end of sequence token",
]
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
TINY = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def make_tokenizer(directory: Path, eos_token: str = "</s>", extra_tokens: tuple[str, ...] = ()) -> None:
    """A small WordLevel tokenizer saved the way transformers saves one (tokenizer.json + configs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = list(SPECIAL_TOKENS.values()) + ["<|eot|>"]
    tokenizer.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{**SPECIAL_TOKENS, "eos_token": eos_token})
    if extra_tokens:
        fast.add_tokens(list(extra_tokens))
    fast.save_pretrained(directory)


def model_config(arch: str, **overrides: Any):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "gpt2":
        return GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, **overrides)
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    settings = {**TINY, "intermediate_size": 128, "num_key_value_heads": 2, "max_position_embeddings": 64,
                "tie_word_embeddings": False, **overrides}
    return config_class(**settings)


def make_base(
    directory: Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "100KB",
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """A random-init model saved as sharded safetensors, with a tokenizer beside it.

    gpt2 is saved from GPT2Model, so its tensors have no `transformer.` prefix (as on the hub) while
    adapters, trained on GPT2LMHeadModel, carry one.
    """
    from transformers import AutoModelForCausalLM, GPT2Model

    torch.manual_seed(seed)
    config = model_config(arch, **overrides)
    model = GPT2Model(config) if arch == "gpt2" else AutoModelForCausalLM.from_config(config)
    model.to(dtype).save_pretrained(directory, max_shard_size=max_shard_size, safe_serialization=True)
    make_tokenizer(directory)
    return directory


def load_model(base_dir: Path, dtype: torch.dtype, bare: bool = False):
    """The causal LM, or with `bare` the model without its head (LlamaModel): adapters trained on
    it name modules `layers.0...` where the saved base says `model.layers.0...`."""
    from transformers import AutoModel, AutoModelForCausalLM

    return (AutoModel if bare else AutoModelForCausalLM).from_pretrained(base_dir, torch_dtype=dtype)


@torch.no_grad()
def make_adapter(
    base_dir: Path, adapter_dir: Path, dtype: torch.dtype, seed: int = 1, bare: bool = False, **lora: Any
) -> Path:
    """A PEFT LoRA adapter for `base_dir` whose every trainable tensor is random (as after training)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(base_dir, dtype, bare), LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad:
            noise = torch.randn(param.shape, generator=generator) * (0.1 if "lora_" in name else 0.02)
            param.add_(noise.to(param.dtype))
    model.save_pretrained(adapter_dir)
    return adapter_dir


@torch.no_grad()
def peft_merged(base_dir: Path, adapter_dir: Path, dtype: torch.dtype, bare: bool = False):
    """The reference: PEFT loads the adapter onto the base and merges it (merge_and_unload), with the fix
    PEFT made after 0.15.2 for lora_bias (peft pull 2489): `base_layer.bias.data += lora_B.bias * scaling`.
    0.15.2 adds lora_B.bias unscaled, which is not what the trained forward pass computes."""
    from peft import PeftModel
    from peft.tuners.lora import Linear

    model = PeftModel.from_pretrained(load_model(base_dir, dtype, bare), adapter_dir)
    fixed = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.lora_bias.get("default"):
            bias = module.get_base_layer().bias.data.clone()
            bias += module.lora_B["default"].bias * module.scaling["default"]
            fixed[name] = bias
    merged = model.merge_and_unload()
    for name, bias in fixed.items():
        merged.get_submodule(name.removeprefix("base_model.model.")).bias.data = bias
    return merged


@torch.no_grad()
def peft_unmerged(base_dir: Path, adapter_dir: Path, dtype: torch.dtype):
    """The trained function itself: base + adapter as PEFT runs it during training (nothing merged)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base_dir, dtype), adapter_dir).eval()


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as fh:
            tensors.update({name: fh.get_tensor(name) for name in fh.keys()})  # noqa: SIM118
    return tensors


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float tensors of one dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    int_type, magnitude = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}[a.element_size()]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        # Sign-magnitude float bits -> integers whose order and spacing follow the floats.
        bits = t.contiguous().view(int_type).to(torch.int64)
        return torch.where(bits < 0, -(bits & magnitude), bits)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def directory_bytes(directory: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in directory.glob(pattern))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
