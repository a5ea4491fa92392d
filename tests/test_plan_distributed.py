"""What multi-node settings do to LLaMA-Factory's arguments and to the run's identity."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import Storage

from entrypoint import datasets
from entrypoint.plan import NON_RESULT_KEYS, build_plan, llamafactory_args
from entrypoint.settings import load_settings


def _settings(storage: Storage, **env: str):
    return load_settings(storage.env(**env))


def test_topology_and_timeout_reach_llamafactory_but_not_the_fingerprint(storage: Storage):
    """The same output trained on one node or four is the same product: a finished run is skipped, an interrupted
    one resumed, whatever the topology it is restarted with."""
    one = build_plan(_settings(storage))
    many = build_plan(_settings(storage, NNODES="4", NODE_RANK="3", MASTER_ADDR="llama-train-x-0.llama-train-nodes",
                                NPROC_PER_NODE="8", DDP_TIMEOUT="7200"))
    assert many.lf_args["ddp_timeout"] == 7200 and one.lf_args["ddp_timeout"] == 1800
    assert many.fingerprint == one.fingerprint
    changed = build_plan(_settings(storage, LORA_RANK="4"))
    assert changed.fingerprint != one.fingerprint, "the comparison above can tell configurations apart"


def test_deepspeed_stages_hand_llamafactory_the_packaged_configs(storage: Storage):
    settings = _settings(storage)
    data = datasets.resolve(Path(settings.dataset_path), settings.dataset, settings.dataset_format,
                            storage.output / ".job" / "dataset_info")
    assert "deepspeed" not in llamafactory_args(settings, data)
    plain = {k: v for k, v in llamafactory_args(settings, data).items() if k not in NON_RESULT_KEYS}
    for stage, number in (("zero2", 2), ("zero3", 3)):
        args = llamafactory_args(_settings(storage, DEEPSPEED=stage), data)
        config = json.loads(Path(args["deepspeed"]).read_text())
        assert config["zero_optimization"]["stage"] == number
        # transformers fills these from BATCH_SIZE, GRADIENT_ACCUMULATION and PRECISION: one source of truth.
        assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
        assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
        # ZeRO only places optimizer state, gradients and weights: the update, hence the result, is the same.
        assert {k: v for k, v in args.items() if k not in NON_RESULT_KEYS} == plain
