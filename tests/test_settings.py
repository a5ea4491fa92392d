"""The typed settings: the original design's names and defaults, validation messages, secrets kept out."""

from __future__ import annotations

import pytest

from entrypoint.errors import ConfigError
from entrypoint.settings import (
    FIELDS,
    FIELDS_BY_ENV,
    check_topology,
    default_configmap,
    load_settings,
    reference_markdown,
)

# The original design's ConfigMap: users' values must carry over unchanged.
ORIGINAL_CONFIGMAP = {
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


def test_original_keys_and_defaults_are_kept():
    cm = default_configmap()
    for key, value in ORIGINAL_CONFIGMAP.items():
        assert cm[key] == value, key
    assert "SERVED_MODEL_NAME" in cm and "DATASET" in cm and cm["DATASET"] == "train_data"


def test_original_values_parse_to_the_right_types():
    s = load_settings({**ORIGINAL_CONFIGMAP, "MLFLOW_TRACKING_URI": "http://mlflow:5000"})
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


# Multi-node topology: explicit variable > Kubeflow Trainer's PET_* > derived from the Indexed Job > default.
INDEXED_POD = {"TRACKING": "none", "NNODES": "4", "JOB_COMPLETION_INDEX": "2", "JOB_NAME": "llama-train-7b9c",
               "MULTINODE_SERVICE": "llama-train-nodes"}
TRAIN_JOB_POD = {"TRACKING": "none", "PET_NNODES": "3", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "tj-node-0-0.tj",
                 "PET_MASTER_PORT": "29400", "JOB_COMPLETION_INDEX": "0"}


def test_single_node_by_default():
    s = load_settings({"TRACKING": "none"})
    assert (s.nnodes, s.node_rank, s.master_addr, s.master_port) == (1, 0, "", 29500)
    assert s.ddp_timeout == 1800 and s.deepspeed == "none"


def test_indexed_job_pod_derives_rank_and_node_zeros_stable_name():
    s = load_settings(INDEXED_POD)
    assert (s.nnodes, s.node_rank, s.master_port) == (4, 2, 29500)
    assert s.master_addr == "llama-train-7b9c-0.llama-train-nodes"


def test_kubeflow_trainer_variables_are_used_when_ours_are_unset():
    s = load_settings(TRAIN_JOB_POD)
    # PET_NODE_RANK wins over the JobSet's own JOB_COMPLETION_INDEX (a TrainJob may number its pods otherwise).
    assert (s.nnodes, s.node_rank, s.master_addr, s.master_port) == (3, 1, "tj-node-0-0.tj", 29400)


def test_explicit_variables_win_over_kubeflow_and_derived_values():
    s = load_settings({**INDEXED_POD, **TRAIN_JOB_POD, "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.7",
                       "MASTER_PORT": "23456"})
    assert (s.nnodes, s.node_rank, s.master_addr, s.master_port) == (2, 0, "10.0.0.7", 23456)


def test_empty_values_count_as_unset():
    # The base ConfigMap carries NNODES= and MASTER_ADDR= (empty): they must not hide PET_* or the derivation.
    s = load_settings({**TRAIN_JOB_POD, "NNODES": "", "MASTER_ADDR": " ", "MASTER_PORT": ""})
    assert (s.nnodes, s.master_addr, s.master_port) == (3, "tj-node-0-0.tj", 29400)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2"}, "MASTER_ADDR is empty while NNODES=2"),
        ({"NNODES": "2", "JOB_NAME": "llama-train-x"}, "MASTER_ADDR is empty while NNODES=2"),
        ({**INDEXED_POD, "JOB_COMPLETION_INDEX": "4"}, "JOB_COMPLETION_INDEX=4) is not below NNODES=4"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a"}, "node rank 2 (NODE_RANK, else"),
        ({"JOB_COMPLETION_INDEX": "1"}, "is not below NNODES=1"),
        ({**INDEXED_POD, "JOB_NAME": "j" * 62}, "too long for a multi-node Job"),
    ],
    ids=["no-master", "no-service", "index-beyond-nnodes", "rank-beyond-nnodes", "indexed-but-single-node",
         "long-job-name"],
)
def test_training_topology_errors_name_the_variable_and_the_way_out(env, message):
    settings = load_settings({"TRACKING": "none", **env})
    with pytest.raises(ConfigError) as err:
        check_topology(settings)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PET_NNODES": "two"}, "PET_NNODES='two' is not valid: expected an integer >= 1 and <= 1024, or empty"),
        ({"NNODES": "0"}, "NNODES='0' is not valid"),
        ({"MASTER_PORT": "80"}, "MASTER_PORT='80' is not valid: expected an integer >= 1024 and <= 65535"),
        ({"DEEPSPEED": "zero1"}, "DEEPSPEED='zero1' is not valid: expected one of none, zero2, zero3"),
        ({"DDP_TIMEOUT": "1"}, "DDP_TIMEOUT='1' is not valid"),
    ],
    ids=["pet-not-a-number", "zero-nodes", "privileged-port", "zero1", "timeout-too-short"],
)
def test_distributed_values_are_validated_like_every_other(env, message):
    with pytest.raises(ConfigError) as err:
        load_settings({"TRACKING": "none", **env})
    assert message in str(err.value)


def test_a_multinode_config_still_serves_the_merge_and_the_webui():
    """Their pods read the same ConfigMap (NNODES=2) but are no Indexed Job: only training needs the topology."""
    s = load_settings({"TRACKING": "none", "NNODES": "2", "JOB_NAME": "llama-merge-7b9c"})
    assert s.nnodes == 2 and s.master_addr == ""


def test_pod_provided_topology_stays_out_of_the_configmap():
    cm = default_configmap()
    assert cm["NNODES"] == "" and cm["MASTER_ADDR"] == "", "a value here would hide PET_* and the derivation"
    assert {"NODE_RANK", "JOB_COMPLETION_INDEX", "MULTINODE_SERVICE"}.isdisjoint(cm)


def test_kubeflow_names_are_declared_with_the_field_they_set():
    assert {name: FIELDS_BY_ENV[name].env for name in ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR",
                                                       "PET_MASTER_PORT")} == {
        "PET_NNODES": "NNODES", "PET_NODE_RANK": "NODE_RANK", "PET_MASTER_ADDR": "MASTER_ADDR",
        "PET_MASTER_PORT": "MASTER_PORT"}
    assert "PET_NNODES" in reference_markdown(), "the reference tells users which Kubeflow name stands in"


def test_every_llamafactory_key_is_an_argument_llamafactory_knows():
    """A setting's lf_key is handed to LLaMA-Factory's own parser: a misspelt key would fail every Job at start."""
    import dataclasses

    from llamafactory.hparams import DataArguments, FinetuningArguments, ModelArguments, TrainingArguments

    known = {f.name for cls in (DataArguments, FinetuningArguments, ModelArguments, TrainingArguments)
             for f in dataclasses.fields(cls)}
    keys = {f.lf_key for f in FIELDS if f.lf_key}
    assert keys - known - {"precision"} == set(), "precision is resolved to bf16/fp16 by the worker"
    assert "neftune_noise_alpha" in keys
