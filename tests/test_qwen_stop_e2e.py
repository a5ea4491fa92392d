"""A Qwen2.5-base-like model trained with TEMPLATE=qwen stops where it was trained to stop once published.

The base ends text with <|endoftext|> (its config, tokenizer and generation config say so); LLaMA-Factory's
qwen template makes <|im_end|> the end of each turn and saves that tokenizer beside the adapter. The published
directory is checked against what `llamafactory-cli export` publishes from the same adapter (the reference),
and then asked through the real vLLM: the answer is the trained one and ends with finish_reason "stop", not
at max_tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, Storage, run_entrypoint
from vllm_server import running

from entrypoint.demo import DEMO_STEPS
from entrypoint.local_vllm import merged_model_flags
from entrypoint.settings import load_settings
from entrypoint.tinymodel import DEMO_ANSWER, DEMO_PROMPT, QWEN_EOS, QWEN_IM_END, make_tiny_qwen2_model

pytestmark = pytest.mark.e2e

MAX_NEW_TOKENS = 32


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Storage, dict[str, str]]:
    """The demo data trained on the Qwen2-style base with TEMPLATE=qwen, merged and published."""
    from entrypoint.tinymodel import write_demo_data

    root = tmp_path_factory.mktemp("qwen") / "storage"
    write_demo_data(root / "data")
    base = make_tiny_qwen2_model(root / "models" / "base-model")
    storage = Storage(root, base)
    env = storage.env(TEMPLATE="qwen", MAX_STEPS=str(DEMO_STEPS), SAVE_STEPS="30", LOGGING_STEPS="10")
    for command in ("train", "merge"):
        result = run_entrypoint(command, env, timeout=900)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
    return storage, env


@pytest.fixture(scope="module")
def exported(published: tuple[Storage, dict[str, str]], tmp_path_factory) -> Path:
    """`llamafactory-cli export` of the same adapter onto the same base: what LLaMA-Factory publishes."""
    storage, _ = published
    work = tmp_path_factory.mktemp("export")
    config = work / "export.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(storage.base), "adapter_name_or_path": str(storage.output),
        "template": "qwen", "finetuning_type": "lora", "export_dir": str(work / "model"),
        "export_device": "cpu"}))
    cli = Path(sys.executable).with_name("llamafactory-cli")
    result = subprocess.run([str(cli), "export", str(config)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "model"


def greedy(model_dir: Path, also_tokenizer_eos: bool = False) -> list[int]:
    """The tokens transformers generates for the demo prompt with the directory's own tokenizer, chat template
    and generation config (its stop ids); with also_tokenizer_eos, stopping at the tokenizer's EOS too, as
    vLLM does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype="float32")
    stops = GenerationConfig.from_pretrained(model_dir).eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops)
    if also_tokenizer_eos:
        stops.append(tokenizer.eos_token_id)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": DEMO_PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt")
    out = model.generate(prompt, attention_mask=prompt.new_ones(prompt.shape), max_new_tokens=MAX_NEW_TOKENS,
                         do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    return out[0, prompt.shape[1]:].tolist()


def test_the_published_tokenizer_and_stop_tokens_are_the_ones_llamafactory_exports(
        published: tuple[Storage, dict[str, str]], exported: Path):
    from transformers import AutoTokenizer

    storage, env = published
    ours = Path(load_settings(env).merged_model_path).resolve()
    mine, theirs = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(exported)
    base = AutoTokenizer.from_pretrained(storage.base)
    assert base.eos_token == QWEN_EOS, "the base ends text with <|endoftext|>"
    assert (mine.eos_token, mine.pad_token) == (theirs.eos_token, theirs.pad_token)
    assert mine.eos_token == QWEN_IM_END
    assert mine.chat_template == theirs.chat_template and mine.chat_template
    chat = [{"role": "user", "content": DEMO_PROMPT}]
    assert mine.apply_chat_template(chat, add_generation_prompt=True) == \
        theirs.apply_chat_template(chat, add_generation_prompt=True)
    stops = json.loads((ours / "generation_config.json").read_text())["eos_token_id"]
    assert mine.convert_tokens_to_ids(QWEN_IM_END) in stops, "generation stops at the trained end of turn"


def test_the_published_model_stops_where_the_exported_one_does(
        published: tuple[Storage, dict[str, str]], exported: Path):
    """Same tokens, same stop. The export's generation_config.json keeps the base's <|endoftext|> alone (only
    a server that also stops at the tokenizer's EOS, like vLLM, stops it); ours stops by its own config too."""
    from transformers import AutoTokenizer

    storage, env = published
    ours = greedy(Path(load_settings(env).merged_model_path))
    theirs = greedy(exported, also_tokenizer_eos=True)
    assert ours == theirs
    assert len(ours) < MAX_NEW_TOKENS, "generation ran to the limit: the stop token was not published"
    assert ours[-1] == AutoTokenizer.from_pretrained(exported).convert_tokens_to_ids(QWEN_IM_END)


def test_vllm_serving_the_published_model_answers_and_stops(published: tuple[Storage, dict[str, str]]):
    storage, env = published
    settings = load_settings(env)
    with running(Path(settings.merged_model_path), merged_model_flags(settings),
                 storage.root / "vllm" / "qwen.log") as server:
        choice = server.chat(settings.served_model_name, DEMO_PROMPT, max_tokens=MAX_NEW_TOKENS)
    assert (choice["message"]["content"].strip(), choice["finish_reason"]) == (DEMO_ANSWER, "stop")
