"""Table-driven bad input: each case exits with the config code, names the problem in stderr and in the
termination log, and leaves nothing behind (no output, the user's data untouched)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Storage, run_entrypoint, snapshot

from entrypoint.errors import ExitCode


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _records(storage: Storage, records) -> None:
    _write(storage.data / "train_data.json", json.dumps(records))


def _yaml(storage: Storage, text: str) -> dict[str, str]:
    _write(storage.root / "extra.yaml", text)
    return {"LLAMAFACTORY_CONFIG": str(storage.root / "extra.yaml")}


def _model_without_config(storage: Storage) -> dict[str, str]:
    broken = storage.root / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"")
    return {"BASE_MODEL_PATH": str(broken)}


def _pickle_only_base(storage: Storage) -> dict[str, str]:
    """A base whose weights are a pickle (.bin): LLaMA-Factory would train it, the merge could not publish it."""
    import shutil

    base = storage.root / "models" / "pickled"
    shutil.copytree(storage.base, base)
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    return {"BASE_MODEL_PATH": str(base)}


def _jsonl(storage: Storage) -> dict[str, str]:
    (storage.data / "dataset_info.json").unlink()
    _write(storage.data / "lines.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    return {"DATASET": "lines"}


def _sharegpt(storage: Storage) -> dict[str, str]:
    _write(storage.data / "dataset_info.json", json.dumps(
        {"chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}}}))
    _write(storage.data / "chat.json", json.dumps([
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "again"}]},
    ]))
    return {"DATASET": "chat"}


def _deepspeed_absent(storage: Storage) -> dict[str, str]:
    # The dev environment (requirements.lock) has no deepspeed; the image installs it (docker/Dockerfile).
    assert importlib.util.find_spec("deepspeed") is None, "this case needs an environment without deepspeed"
    return {"DEEPSPEED": "zero3"}


Case = tuple[str, Callable[[Storage], dict[str, str]], str]
CASES: list[Case] = [
    ("unknown-finetuning-type", lambda s: {"FINETUNING_TYPE": "qlora4"},
     "FINETUNING_TYPE='qlora4' is not valid: expected one of lora, qlora, full"),
    ("rank-not-a-number", lambda s: {"LORA_RANK": "eight"}, "LORA_RANK='eight' is not valid"),
    ("rank-zero", lambda s: {"LORA_RANK": "0"}, "LORA_RANK='0' is not valid: expected an integer >= 1"),
    ("negative-learning-rate", lambda s: {"LEARNING_RATE": "-1e-4"}, "LEARNING_RATE='-1e-4' is not valid"),
    ("epochs-nan", lambda s: {"NUM_EPOCHS": "nan"}, "NUM_EPOCHS='nan' is not valid"),
    ("batch-size-fraction", lambda s: {"BATCH_SIZE": "1.5"}, "BATCH_SIZE='1.5' is not valid: expected an integer"),
    ("cutoff-too-small", lambda s: {"CUTOFF_LEN": "4"}, "CUTOFF_LEN='4' is not valid"),
    ("relative-model-path", lambda s: {"BASE_MODEL_PATH": "models/base"},
     "BASE_MODEL_PATH='models/base' is not valid: expected an absolute path"),
    ("missing-model", lambda s: {"BASE_MODEL_PATH": str(s.root / "models" / "nope")}, "does not exist"),
    ("model-without-config", _model_without_config, "has no config.json"),
    ("base-weights-only-pickle", _pickle_only_base, "has no safetensors weights"),
    ("missing-dataset-dir", lambda s: {"DATASET_PATH": str(s.root / "no-data")}, "is not a directory"),
    ("dataset-not-registered", lambda s: {"DATASET": "other"},
     "DATASET='other' is not in"),
    ("alpaca-record-without-output", lambda s: _records(s, [{"instruction": "q", "output": "a"}] * 3 + [
        {"instruction": "q", "input": ""}]) or {}, "record 4: field 'output' must be a non-empty string"),
    ("dataset-not-json", lambda s: _write(s.data / "train_data.json", "[{oops") or {}, "not valid JSON"),
    ("empty-dataset", lambda s: _records(s, []) or {}, "contains no records"),
    ("jsonl-bad-line", _jsonl, "line 2 is not valid JSON"),
    ("sharegpt-role-order", _sharegpt, "record 2: message 2 has from='human'"),
    ("field-not-mapped", lambda s: _records(s, [{"instruction": "q", "output": "a", "system": "Be brief."}]) or {},
     "record 1: field 'system' would be dropped"),
    ("hub-dataset", lambda s: _write(s.data / "dataset_info.json", json.dumps(
        {"train_data": {"hf_hub_url": "someone/data"}})) or {}, "only local files are supported"),
    ("qlora-without-cuda", lambda s: {"FINETUNING_TYPE": "qlora"}, "FINETUNING_TYPE=qlora needs a CUDA GPU"),
    ("tracking-without-uri", lambda s: {"TRACKING": "mlflow"}, "MLFLOW_TRACKING_URI is empty while TRACKING=mlflow"),
    ("yaml-sets-owned-key", lambda s: _yaml(s, "output_dir: /elsewhere\nlora_rank: 4\n"),
     "sets output_dir: these are owned by the entrypoint"),
    ("yaml-not-a-mapping", lambda s: _yaml(s, "- a\n- b\n"), "must be a mapping"),
    ("yaml-unknown-key", lambda s: _yaml(s, "lora_rnak: 4\n"), "LLaMA-Factory rejected the arguments"),
    ("output-inside-model", lambda s: {"LORA_OUTPUT_PATH": str(s.base / "out")}, "overlaps BASE_MODEL_PATH"),
    ("nproc-zero", lambda s: {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE='0' is not valid"),
    ("multinode-without-master", lambda s: {"NNODES": "2"}, "MASTER_ADDR is empty while NNODES=2"),
    ("node-rank-beyond-nnodes", lambda s: {"NNODES": "2", "MASTER_ADDR": "node0", "JOB_COMPLETION_INDEX": "2"},
     "is not below NNODES=2"),
    ("deepspeed-not-installed", _deepspeed_absent, "DEEPSPEED=zero3 needs the deepspeed package"),
    ("yaml-deepspeed-missing-file", lambda s: _yaml(s, "deepspeed: /nonexistent/ds.json\n"),
     "/nonexistent/ds.json is not a file"),
]


@pytest.mark.parametrize(("name", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_leaves_nothing(storage: Storage, name, setup, expected):
    overrides = setup(storage)
    data_before = snapshot(storage.data)
    model_before = snapshot(storage.base)
    result = run_entrypoint("train", storage.env(**overrides), timeout=120)
    assert result.returncode == ExitCode.CONFIG, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr[-2000:]
    assert expected in storage.termination_log()
    assert storage.termination_log().startswith("exit 78: ")
    assert not storage.output.exists(), "a refused run created its output directory"
    assert not (storage.output.parent / f".{storage.output.name}.lock").exists()
    assert snapshot(storage.data) == data_before
    assert snapshot(storage.base) == model_before


def test_usage_error_is_a_config_error(storage: Storage):
    result = run_entrypoint("trian", storage.env())
    assert result.returncode == ExitCode.CONFIG
    assert "invalid choice: 'trian'" in result.stderr
