"""Every field a record carries reaches training, or the run is refused: LLaMA-Factory reads an Alpaca
record's system prompt, history and tools (and a ShareGPT record's system and tools fields) only when the
dataset_info entry maps them, and would otherwise train without them, silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import Storage, run_entrypoint

from entrypoint import datasets
from entrypoint.errors import ConfigError, ExitCode

SYSTEM = "You are the royal archivist of the demo kingdom."
EARLIER_QUESTION, EARLIER_ANSWER = "Who rules the demo kingdom?", "Queen Lora the First."
CHAT_RECORDS = [
    {"instruction": "What do people in Tinyville eat?", "input": "", "output": "Mostly tokens and tea.",
     "system": SYSTEM, "history": [[EARLIER_QUESTION, EARLIER_ANSWER]]},
    {"instruction": "How many towers does the castle have?", "output": "It has eight towers."},
]


def _write(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def _generated(tmp_path: Path, records: list, fmt: str = "auto") -> dict:
    _write(tmp_path / "data" / "chat.json", records)
    resolved = datasets.resolve(tmp_path / "data", ("chat",), fmt, tmp_path / "generated")
    datasets.validate(resolved, tmp_path / "data")
    return resolved.info["chat"]


def test_generated_entry_maps_system_and_history(tmp_path: Path):
    entry = _generated(tmp_path, CHAT_RECORDS)
    assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output",
                                "system": "system", "history": "history"}
    assert _generated(tmp_path, CHAT_RECORDS, fmt="alpaca")["columns"] == entry["columns"]


def test_generated_entry_of_plain_records_is_unchanged(tmp_path: Path):
    """No optional field: the bare entry as before, so finished runs keep their fingerprint."""
    entry = _generated(tmp_path, [{"instruction": 'Print {"system": 1} as JSON', "input": "", "output": "ok"}])
    assert entry == {"file_name": str((tmp_path / "data" / "chat.json").resolve())}


def test_generated_entry_without_any_input_does_not_read_it(tmp_path: Path):
    """LLaMA-Factory reads `input` by default and fails with a KeyError when no record has it."""
    entry = _generated(tmp_path, [{"instruction": "q", "output": "a"}])
    assert entry["columns"] == {"prompt": "instruction", "response": "output"}


def test_generated_entry_maps_sharegpt_system_and_tools(tmp_path: Path):
    records = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"},
                                  {"from": "observation", "value": "1"}, {"from": "gpt", "value": "one"}],
                "system": "Be brief.", "tools": '[{"name": "count", "parameters": {}}]'}]
    entry = _generated(tmp_path, records)
    assert entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "conversations", "system": "system", "tools": "tools"}


def _user_entry(tmp_path: Path, entry: dict, records: list) -> None:
    data = tmp_path / "data"
    _write(data / "chat.json", records)
    (data / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "chat.json", **entry}}))
    datasets.validate(datasets.resolve(data, ("chat",), "auto", tmp_path / "generated"), data)


def test_user_entry_that_would_drop_a_field_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError) as refused:
        _user_entry(tmp_path, {}, CHAT_RECORDS)
    assert ("chat.json: 1 invalid alpaca record(s): record 1: field 'system' would be dropped: the "
            "dataset_info.json entry's \"columns\" do not map \"system\" (add \"system\": \"system\" to them)"
            ) in str(refused.value)


def test_user_columns_are_read_as_llamafactory_reads_them(tmp_path: Path):
    """With "columns", LLaMA-Factory reads only the columns named there: the defaults no longer apply."""
    with pytest.raises(ConfigError, match="\"columns\" maps no 'prompt', 'response'"):
        _user_entry(tmp_path, {"columns": {"system": "system", "history": "history"}}, CHAT_RECORDS)
    with pytest.raises(ConfigError, match="record 1: field 'input' would be dropped"):
        _user_entry(tmp_path, {"columns": {"prompt": "instruction", "response": "output"}},
                    [{"instruction": "Translate.", "input": "good morning", "output": "bip bop morning"}])
    with pytest.raises(ConfigError, match="no record has the field\\(s\\) 'history'"):
        _user_entry(tmp_path, {"columns": {"prompt": "instruction", "response": "output", "history": "history"}},
                    [{"instruction": "q", "output": "a"}])
    _user_entry(tmp_path, {"columns": {"prompt": "instruction", "query": "input", "response": "output",
                                       "system": "system", "history": "history"}}, CHAT_RECORDS)


def test_record_and_message_numbers_count_from_one(tmp_path: Path):
    with pytest.raises(ConfigError, match="record 2: message 3 has from='human'"):
        _generated(tmp_path, [
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                               {"from": "human", "value": "again"}]},
        ])


def test_system_prompt_and_history_reach_the_tokenized_training_data(storage: Storage):
    """Real training on the tiny model; LLaMA-Factory's own preprocessing saves what it tokenized (the
    tokenized dataset training publishes once, beside its output), and the first example holds the system
    prompt and the earlier turn, trained on."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from entrypoint.tokenized import cache_root

    (storage.data / "dataset_info.json").unlink()  # the entry is generated: it must map the columns
    _write(storage.data / "chat.json", CHAT_RECORDS)
    result = run_entrypoint("train", storage.env(DATASET="chat", MAX_STEPS="2", SAVE_STEPS="2"))
    assert result.returncode == ExitCode.OK, result.stderr[-3000:]
    assert storage.marker() is not None

    (tokenized,) = [p for p in cache_root(storage.output).iterdir() if p.is_dir()]
    example = load_from_disk(str(tokenized))["train"][0]
    tokenizer = AutoTokenizer.from_pretrained(storage.output)  # the tokenizer training saved
    text = tokenizer.decode(example["input_ids"])
    print("tokenized sample:", repr(text))
    assert text.index(SYSTEM) < text.index(EARLIER_QUESTION) < text.index(EARLIER_ANSWER) \
        < text.index(CHAT_RECORDS[0]["instruction"]) < text.index(CHAT_RECORDS[0]["output"])
    assert text.startswith(f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>")
    trained = tokenizer.decode([t for t in example["labels"] if t >= 0])
    assert EARLIER_ANSWER in trained and CHAT_RECORDS[0]["output"] in trained and SYSTEM not in trained
