"""A tiny causal LM and demo datasets generated on the spot: no model hub, ever.

A random-init Llama of a few layers with a byte-level BPE tokenizer trained on the demo texts, the
llama3 special tokens (so the original design's TEMPLATE=llama3 works unchanged) and a chat template. Used by
the local demo and the tests; small enough that LoRA training on the CPU takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BOS, EOS, EOM = "<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>"
SPECIAL_TOKENS = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOS, EOM]
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


def build_tokenizer(vocab_size: int = 384) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[EOM],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def make_tiny_model(
    dest: Path,
    layers: int = 2,
    hidden: int = 64,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Write a random-init Llama with tokenizer, chat template and generation config into dest."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype=dtype,
        # With the usual 0.02 a frozen random lm_head can barely move the logits, and LoRA on such a
        # small model could never make an answer likely: wider init lets a few steps teach it.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    dest.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(dest, **kwargs)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOM)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    ).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def write_demo_data(data_dir: Path, name: str = "train_data", fmt: str = "alpaca", repeat: int = 1) -> Path:
    """The original design's layout: <data>/<name>.json registered in <data>/dataset_info.json."""
    data_dir.mkdir(parents=True, exist_ok=True)
    records = (DEMO_RECORDS if fmt == "alpaca" else SHAREGPT_RECORDS) * repeat
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
