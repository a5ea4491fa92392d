"""The typed settings: the seed's names and defaults, validation messages, secrets kept out."""

from __future__ import annotations

import pytest

from entrypoint.errors import ConfigError
from entrypoint.settings import FIELDS, default_configmap, load_settings, reference_markdown

# The seed's ConfigMap (REFERENCE.md): users' values must carry over unchanged.
SEED_CONFIGMAP = {
    "BASE_MODEL_PATH": "/storage/models/base-model",
    "LORA_OUTPUT_PATH": "/storage/output/lora-adapter",
    "MERGED_MODEL_PATH": "/storage/models/merged-model",
    "DATASET_PATH": "/storage/data",
    "FINETUNING_TYPE": "lora",
    "LORA_RANK": "8",
    "LORA_ALPHA": "16",
    "TEMPLATE": "llama3",
    "CUTOFF_LEN": "2048",
    "BATCH_SIZE": "1",
    "GRADIENT_ACCUMULATION": "8",
    "LEARNING_RATE": "1.0e-4",
    "NUM_EPOCHS": "3",
    "MAX_MODEL_LEN": "4096",
    "TENSOR_PARALLEL_SIZE": "1",
}


def test_seed_keys_and_defaults_are_kept():
    cm = default_configmap()
    for key, value in SEED_CONFIGMAP.items():
        assert cm[key] == value, key
    assert "SERVED_MODEL_NAME" in cm and "DATASET" in cm and cm["DATASET"] == "train_data"


def test_seed_values_parse_to_the_right_types():
    s = load_settings({**SEED_CONFIGMAP, "MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert s.lora_rank == 8 and s.learning_rate == 1.0e-4 and s.num_epochs == 3.0
    assert s.dataset == ("train_data",) and s.lora_target == ("all",) and s.replace_output is False


def test_every_problem_is_reported_at_once_with_name_value_and_allowed():
    with pytest.raises(ConfigError) as err:
        load_settings({"LORA_RANK": "eight", "FINETUNING_TYPE": "qlora4", "TRACKING": "none"})
    text = str(err.value)
    assert "FINETUNING_TYPE='qlora4' is not valid: expected one of lora, qlora, full" in text
    assert "LORA_RANK='eight' is not valid: expected an integer >= 1 and <= 1024" in text


def test_secret_values_never_appear_in_errors_or_public_values():
    s = load_settings({"MLFLOW_TRACKING_URI": "https://u:pw@mlflow.example"})
    assert "MLFLOW_TRACKING_URI" not in s.public()
    assert all("pw@" not in str(v) for v in s.public().values())


def test_tracking_without_uri_says_how_to_fix_it():
    with pytest.raises(ConfigError, match="TRACKING=none"):
        load_settings({})


def test_reference_documents_every_field():
    table = reference_markdown()
    for field in FIELDS:
        assert f"`{field.env}`" in table
    assert len({f.env for f in FIELDS}) == len(FIELDS)


def test_booleans_and_choices_are_case_insensitive():
    s = load_settings({"TRACKING": "NONE", "REPLACE_OUTPUT": "Yes", "PRECISION": "BF16"})
    assert s.tracking == "none" and s.replace_output is True and s.precision == "bf16"
