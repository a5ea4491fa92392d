"""Tokenize once (entrypoint/tokenized.py): the tokenized dataset is published once beside the outputs and
reused by every attempt and every run that would tokenize the same way; never when an input changed, never
partial, one copy whatever the number of writers.

Real LLaMA-Factory tokenization and training on the tiny model. The soak test (test_preemption_soak.py)
interrupts tokenization itself, with SIGTERM and SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from helpers import Storage, run_entrypoint

from entrypoint import tokenized
from entrypoint.errors import ConfigError, TemporaryFailure
from entrypoint.plan import TrainPlan, build_plan
from entrypoint.settings import load_settings


def plan_for(storage: Storage, **overrides: str) -> TrainPlan:
    return build_plan(load_settings(storage.env(**overrides)))


def inputs_of(plan: TrainPlan, args: dict | None = None) -> dict:
    return tokenized.key_inputs(args or plan.lf_args, plan.fingerprint_inputs["data"], plan.fingerprint_inputs["model"])


def cache_of(plan: TrainPlan) -> Path:
    return tokenized.cache_path(plan.output, inputs_of(plan))


def test_training_settings_reuse_the_tokenized_dataset_and_tokenization_inputs_do_not(
        storage: Storage, tmp_path: Path):
    reference = cache_of(plan_for(storage))
    assert reference.parent == storage.output.parent / ".tokenized"
    yaml = tmp_path / "lf.yaml"
    for overrides in ({"LEARNING_RATE": "5e-3"}, {"LORA_RANK": "4", "LORA_ALPHA": "8"}, {"NUM_EPOCHS": "7"},
                      {"MAX_STEPS": "7"}, {"SAVE_STEPS": "3"}, {"BATCH_SIZE": "2"}, {"LORA_DROPOUT": "0.1"},
                      {"LORA_OUTPUT_PATH": str(storage.output.parent / "another-run")},
                      {"LLAMAFACTORY_CONFIG": str(yaml)}):
        yaml.write_text("weight_decay: 0.1\n")
        assert cache_of(plan_for(storage, **overrides)) == reference.with_name(reference.name), overrides
    plan = plan_for(storage)
    resumed = {**plan.lf_args, "resume_from_checkpoint": str(plan.output / "checkpoint-10"),
               "overwrite_output_dir": True}
    assert tokenized.cache_path(plan.output, inputs_of(plan, resumed)) == reference

    keys = {reference.name}
    for overrides in ({"CUTOFF_LEN": "64"}, {"TEMPLATE": "qwen"}, {"MAX_SAMPLES": "4"}, {"SEED": "7"},
                      {"LLAMAFACTORY_CONFIG": str(yaml)}):
        yaml.write_text("train_on_prompt: true\n")
        keys.add(cache_of(plan_for(storage, **overrides)).name)
    assert len(keys) == 6, "each change of what tokenization reads must give another tokenized dataset"

    records = json.loads((storage.data / "train_data.json").read_text())
    records[0]["output"] += "!"
    (storage.data / "train_data.json").write_text(json.dumps(records))
    assert cache_of(plan_for(storage)) != reference, "changed records"

    base = tmp_path / "base-copy"
    shutil.copytree(storage.base, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    other_tokenizer = cache_of(plan_for(storage, BASE_MODEL_PATH=str(base)))
    assert other_tokenizer != cache_of(plan_for(storage)), "changed tokenizer"


def test_llamafactory_config_may_not_set_the_tokenized_path(storage: Storage, tmp_path: Path):
    yaml = tmp_path / "lf.yaml"
    yaml.write_text("tokenized_path: /somewhere\n")
    with pytest.raises(ConfigError, match="tokenized_path"):
        plan_for(storage, LLAMAFACTORY_CONFIG=str(yaml))


@pytest.mark.e2e
def test_a_run_on_the_published_dataset_trains_the_same_adapter_as_the_run_that_tokenized(storage: Storage):
    first = run_entrypoint("train", storage.env())
    assert first.returncode == 0, first.stderr[-3000:]
    assert "tokenized dataset: published" in first.stderr
    second_output = storage.output.parent / "second"
    second = run_entrypoint("train", storage.env(LORA_OUTPUT_PATH=str(second_output)))
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr  # LLaMA-Factory logs to stdout
    assert "tokenized dataset: reusing" in log and "Loaded tokenized dataset from" in log
    assert "Running tokenizer on dataset" not in log
    assert len(list((storage.output.parent / ".tokenized").iterdir())) == 1

    import torch
    from safetensors.torch import load_file

    a = load_file(storage.output / "adapter_model.safetensors")
    b = load_file(second_output / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def rows(directory: Path) -> list[dict]:
    from datasets import load_from_disk

    return load_from_disk(str(directory))["train"].to_list()


@pytest.fixture
def tokenizing(storage: Storage) -> tuple[TrainPlan, dict]:
    plan = plan_for(storage)
    plan.output.mkdir(parents=True)
    return plan, inputs_of(plan)


def test_a_partial_or_broken_cache_is_never_used(tokenizing):
    plan, inputs = tokenizing
    work = plan.output / ".job" / tokenized.WORK_DIR
    work.mkdir(parents=True)
    (work / "dataset_dict.json").write_text("{")  # what a killed attempt left
    target = tokenized.ensure(plan.lf_args, inputs, plan.output)
    assert not work.exists()
    good = rows(target)
    assert len(good) == 8 and all(r["input_ids"] and r["labels"] for r in good)

    arrow = next(target.rglob("*.arrow"))
    with open(arrow, "r+b") as fh:
        fh.truncate(arrow.stat().st_size // 2)  # a torn copy
    assert tokenized.problem(target).endswith("were written")
    assert tokenized.ensure(plan.lf_args, inputs, plan.output) == target
    assert rows(target) == good
    (target / tokenized.RECORD).unlink()  # never completed
    assert tokenized.ensure(plan.lf_args, inputs, plan.output) == target
    assert rows(target) == good and tokenized.problem(target) is None
    assert len(list(target.parent.glob(f"{target.name}.broken-*"))) == 2, "broken copies are moved aside"


def test_two_writers_publish_one_copy(tokenizing, monkeypatch):
    plan, inputs = tokenizing
    other_output = plan.output.parent / "other"
    other_output.mkdir()
    real = tokenized.tokenize
    calls = []

    def tokenize_while_another_run_publishes(args, directory):
        calls.append(directory)
        real(args, directory)
        if len(calls) == 1:  # the other run tokenizes, and publishes first
            tokenized.ensure(plan.lf_args, inputs, other_output)

    monkeypatch.setattr(tokenized, "tokenize", tokenize_while_another_run_publishes)
    target = tokenized.ensure(plan.lf_args, inputs, plan.output)
    assert len(calls) == 2 and calls[0] != calls[1]
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    assert tokenized.problem(target) is None and len(rows(target)) == 8
    assert not calls[0].exists(), "the copy that lost the race is removed"


def test_a_run_that_lost_its_lock_publishes_nothing(tokenizing):
    plan, inputs = tokenizing

    def lost() -> None:
        raise TemporaryFailure("this run lost the output lock")

    with pytest.raises(TemporaryFailure):
        tokenized.ensure(plan.lf_args, inputs, plan.output, lost)
    assert not tokenized.cache_path(plan.output, inputs).exists()


def test_other_nodes_wait_for_node_zero_to_publish(tokenizing):
    plan, inputs = tokenizing
    target = tokenized.ensure(plan.lf_args, inputs, plan.output)
    hidden = target.with_name("hidden")
    os.rename(target, hidden)
    with pytest.raises(TemporaryFailure, match="did not publish the tokenized dataset"):
        tokenized.wait_for(target, timeout=0.1)

    publish = threading.Timer(1.0, os.rename, (hidden, target))
    publish.start()
    t0 = time.monotonic()
    tokenized.wait_for(target, timeout=30)
    assert time.monotonic() - t0 >= 1.0
    publish.join()
