"""`python -m entrypoint check` prints the records' token lengths, as LLaMA-Factory will count them, so that
CUTOFF_LEN can be chosen from the data. Checked against LLaMA-Factory's own preprocessing of the same records."""

from __future__ import annotations

import json

from helpers import Storage, run_entrypoint

from entrypoint.token_lengths import nearest_rank

RECORDS = [
    {"instruction": "What is the capital of the demo kingdom?", "input": "", "output": "Tinyville."},
    {"instruction": "Translate to the demo language.", "input": "good morning " * 12, "output": "bip bop " * 20,
     "system": "You translate.", "history": [["Who rules?", "Queen Lora the First."]] * 3},
    {"instruction": "Name the river.", "input": "", "output": "The Byte river, " * 30},
] + [{"instruction": f"Count to {n}.", "input": "", "output": " ".join(map(str, range(n)))} for n in range(1, 30)]


def _llamafactory_lengths(storage: Storage) -> list[int]:
    """Token counts of LLaMA-Factory's own tokenized training set (nothing cut: a cutoff beyond every record)."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args({
        "stage": "sft", "do_train": True, "model_name_or_path": str(storage.base), "dataset": "lengths",
        "dataset_dir": str(storage.data), "template": "llama3", "cutoff_len": 100_000, "finetuning_type": "lora",
        "output_dir": str(storage.root / "lf-output"), "overwrite_output_dir": True, "report_to": "none",
    })
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    return sorted(len(ids) for ids in dataset["train_dataset"]["input_ids"])


def test_check_prints_the_token_lengths_llamafactory_trains_on(storage: Storage):
    (storage.data / "lengths.json").write_text(json.dumps(RECORDS))
    (storage.data / "dataset_info.json").write_text(json.dumps({"lengths": {
        "file_name": "lengths.json",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                    "history": "history"}}}))
    result = run_entrypoint("check", storage.env(DATASET="lengths", CUTOFF_LEN="64"), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)["token_lengths"]

    expected = _llamafactory_lengths(storage)
    assert len(expected) == len(RECORDS)
    assert report == {
        "records": len(RECORDS), "measured": len(RECORDS),
        **{f"p{p}": nearest_rank(expected, p) for p in (50, 90, 95, 99)},
        "max": expected[-1], "cutoff_len": 64, "longer_than_cutoff": sum(n > 64 for n in expected),
        "tokens": sum(expected),
    }
    assert 0 < report["longer_than_cutoff"] < len(RECORDS), "the records should straddle the cutoff"
    assert "longer than CUTOFF_LEN=64" in result.stderr


def test_nearest_rank():
    values = list(range(1, 101))
    assert [nearest_rank(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert nearest_rank([7], 50) == 7
