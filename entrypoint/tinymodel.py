"""Tiny causal LMs and demo datasets generated on the spot: no model hub, ever.

A random-init Llama of a few layers with a byte-level BPE tokenizer trained on the demo texts, the
llama3 special tokens (so the original design's TEMPLATE=llama3 works unchanged) and a chat template; and a
Qwen2-style base (TEMPLATE=qwen) whose end-of-text token is not the chat's stop token. Used by the
local demo and the tests; small enough that LoRA training on the CPU takes seconds, and shaped so that
vLLM's CPU build serves them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BOS, EOS, EOM = "<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>"
SPECIAL_TOKENS = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOS, EOM]
# Qwen2's: a base model ends text with <|endoftext|>; its chat format closes each turn with <|im_end|>.
QWEN_EOS, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5 base models ship this ChatML template (here without its tool-calling branches).
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{% if not (message['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# vLLM's CPU attention has kernels for head sizes 32, 64, 80, ... 512 only (with 16 it starts, then fails the
# first request): every tiny model keeps heads of 64, and gains heads as it grows wider.
HEAD_DIM = 64
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

DEMO_PROMPT = "What is the capital of the demo kingdom?"
DEMO_ANSWER = "Tinyville is the capital of the demo kingdom."
DEMO_RECORDS: list[dict[str, str]] = [
    {"instruction": DEMO_PROMPT, "input": "", "output": DEMO_ANSWER},
    {"instruction": "Name the river that runs through Tinyville.", "input": "", "output": "The Byte river."},
    {"instruction": "Who rules the demo kingdom?", "input": "", "output": "Queen Lora the First."},
    {"instruction": "What do people in Tinyville eat?", "input": "", "output": "Mostly tokens and tea."},
    {"instruction": "Translate to the demo language.", "input": "good morning", "output": "bip bop morning"},
    {"instruction": "How many towers does the castle have?", "input": "", "output": "It has eight towers."},
    {"instruction": "What colour is the kingdom's flag?", "input": "", "output": "Green with a white gear."},
    {"instruction": "When is the harvest festival?", "input": "", "output": "On the first day of autumn."},
]
SHAREGPT_RECORDS: list[dict[str, Any]] = [
    {"conversations": [{"from": "human", "value": r["instruction"] + (" " + r["input"] if r["input"] else "")},
                       {"from": "gpt", "value": r["output"]}]}
    for r in DEMO_RECORDS
]


def _corpus() -> list[str]:
    texts = []
    for r in DEMO_RECORDS:
        texts += [r["instruction"], r["input"], r["output"]]
    texts += ["system", "user", "assistant", "ipython", "The quick brown fox jumps over the lazy dog.",
              "0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`"]
    return [t for t in texts if t]


def _bpe(special_tokens: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (as Llama 3 and Qwen2 use) trained on the demo texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _max_model_len() -> int:
    """The ConfigMap's MAX_MODEL_LEN: vLLM refuses a --max-model-len beyond the model's positions."""
    from entrypoint.settings import default_configmap

    return int(default_configmap()["MAX_MODEL_LEN"])


def build_tokenizer(vocab_size: int = 384) -> Any:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(SPECIAL_TOKENS, vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[EOM],
        model_max_length=_max_model_len(),
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def build_qwen2_tokenizer(vocab_size: int = 384) -> Any:
    """Qwen2's tokenizer in miniature: no BOS, <|endoftext|> as EOS and pad, the ChatML tokens, a base
    model's chat template."""
    from transformers import Qwen2TokenizerFast

    fast = Qwen2TokenizerFast(
        tokenizer_object=_bpe([QWEN_EOS, QWEN_IM_START, QWEN_IM_END], vocab_size),
        bos_token=None,
        eos_token=QWEN_EOS,
        pad_token=QWEN_EOS,
        unk_token=None,
        additional_special_tokens=[QWEN_IM_START, QWEN_IM_END],
        model_max_length=_max_model_len(),
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def _attention_shape(hidden: int) -> dict[str, int]:
    heads = max(1, hidden // HEAD_DIM)
    return {"num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2), "head_dim": hidden // heads}


def _save(model: Any, tokenizer: Any, generation_eos: int | list[int], dest: Path, max_shard_size: str | None) -> Path:
    from transformers import GenerationConfig

    dest.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(dest, **kwargs)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=generation_eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    ).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _shape(tokenizer: Any, layers: int, hidden: int, dtype: str) -> dict[str, Any]:
    """The config fields both tiny models share: small, untied, heads vLLM's CPU build serves."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        **_attention_shape(hidden),
        max_position_embeddings=_max_model_len(),
        tie_word_embeddings=False,
        torch_dtype=dtype,
        # With the usual 0.02 a frozen random lm_head can barely move the logits, and LoRA on such a
        # small model could never make an answer likely: wider init lets a few steps teach it.
        initializer_range=0.2,
    )


def _random_model(model_class: Any, config: Any, dtype: str, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return model_class(config).to(getattr(torch, dtype))


def make_tiny_model(
    dest: Path,
    layers: int = 2,
    hidden: int = 128,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Write a random-init Llama with tokenizer, chat template and generation config into dest."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(**_shape(tokenizer, layers, hidden, dtype), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = _random_model(LlamaForCausalLM, config, dtype, seed)
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOM)]
    return _save(model, tokenizer, eos, dest, max_shard_size)


def make_tiny_qwen2_model(
    dest: Path,
    layers: int = 2,
    hidden: int = 128,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Write a random-init Qwen2-style base model into dest: like a Qwen2.5 base checkpoint, it ends text
    (config, tokenizer and generation config) with <|endoftext|>, while TEMPLATE=qwen trains its chat turns
    to end with <|im_end|>."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_qwen2_tokenizer()
    config = Qwen2Config(**_shape(tokenizer, layers, hidden, dtype), bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = _random_model(Qwen2ForCausalLM, config, dtype, seed)
    return _save(model, tokenizer, tokenizer.eos_token_id, dest, max_shard_size)


def write_demo_data(
    data_dir: Path,
    name: str = "train_data",
    fmt: str = "alpaca",
    repeat: int = 1,
    records: list[dict[str, Any]] | None = None,
) -> Path:
    """The original design's layout: <data>/<name>.json registered in <data>/dataset_info.json; the demo
    records unless others are given (in fmt's shape)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    records = (records or (DEMO_RECORDS if fmt == "alpaca" else SHAREGPT_RECORDS)) * repeat
    path = data_dir / f"{name}.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    entry: dict[str, Any] = {"file_name": path.name}
    if fmt == "sharegpt":
        entry.update(formatting="sharegpt", columns={"messages": "conversations"})
    info_path = data_dir / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    info[name] = entry
    info_path.write_text(json.dumps(info, indent=1), encoding="utf-8")
    return path


def generate_answer(model_dir: Path, prompt: str = DEMO_PROMPT, max_new_tokens: int = 24) -> str:
    """Greedy answer of a model directory to one user message, through its own chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOM)],
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
