"""From validated settings to the exact LLaMA-Factory arguments and the run's fingerprint.

Precedence (documented in README.md): built-in defaults < environment (ConfigMap) < LLAMAFACTORY_CONFIG
YAML. The YAML is the most specific statement of intent, so its keys win, except the keys this
entrypoint owns (paths, dataset, resume and reporting), which the YAML may not set.
"""

from __future__ import annotations

import glob
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoint import datasets
from entrypoint.errors import ConfigError
from entrypoint.fingerprint import digest
from entrypoint.model_dir import (
    EMBEDDING_MODULES,
    UNTIE_MODEL_TYPES,
    BaseModel,
    check_trainable_base,
    model_identity,
    tied_embeddings_problem,
    tied_input_embedding,
)
from entrypoint.settings import FIELDS, Settings, llamafactory_values, non_result_lf_keys
from entrypoint.storage import STATE_DIR

OWNED_KEYS = {
    "model_name_or_path": "BASE_MODEL_PATH",
    "adapter_name_or_path": "BASE_MODEL_PATH (train on a merged model instead)",
    "output_dir": "LORA_OUTPUT_PATH",
    "dataset": "DATASET",
    "dataset_dir": "DATASET_PATH",
    "do_train": "(always true)",
    "stage": "(always sft)",
    "overwrite_output_dir": "REPLACE_OUTPUT",
    "resume_from_checkpoint": "(resume is automatic)",
    "report_to": "TRACKING",
    "logging_dir": "(kept inside LORA_OUTPUT_PATH)",
    "tokenized_path": "(tokenized once, into .tokenized beside LORA_OUTPUT_PATH)",
}
# Arguments that do not change the trained result: left out of the run's identity, so changing them on a
# finished run does not count as a different config. Besides the settings marked so (settings.py): where
# things are written, how progress is reported, and keys only a LLAMAFACTORY_CONFIG YAML sets. `deepspeed`
# (the ZeRO stage) only decides where optimizer state, gradients and weights live: every rank still applies
# the same averaged update (docs/adr/006-multinode.md).
NON_RESULT_KEYS = non_result_lf_keys() | {
    "output_dir", "dataset_dir", "report_to", "plot_loss", "overwrite_output_dir", "resume_from_checkpoint",
    "deepspeed", "preprocessing_num_workers", "dataloader_num_workers", "overwrite_cache",
}
FIELDS_BY_LF_KEY = {f.lf_key: f for f in FIELDS if f.lf_key}
# DeepSpeed configs shipped inside the package (LLaMA-Factory's examples/deepspeed, "auto" values filled in
# by transformers from the training arguments).
DEEPSPEED_CONFIGS = {"zero2": "ds_z2.json", "zero3": "ds_z3.json"}
DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"


@dataclass(frozen=True)
class TrainPlan:
    settings: Settings
    output: Path
    lf_args: dict[str, Any]
    fingerprint: str
    fingerprint_inputs: dict[str, Any]
    data: datasets.ResolvedDatasets
    base: BaseModel


def read_yaml_overrides(settings: Settings) -> dict[str, Any]:
    path_text = settings.llamafactory_config
    if not path_text:
        return {}
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"LLAMAFACTORY_CONFIG={path_text!r} is not a file")
    import yaml  # small, and only needed when a YAML is given

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"LLAMAFACTORY_CONFIG={path_text!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"LLAMAFACTORY_CONFIG={path_text!r} must be a mapping of LLaMA-Factory arguments")
    owned = sorted(k for k in data if k in OWNED_KEYS)
    if owned:
        raise ConfigError(
            f"LLAMAFACTORY_CONFIG={path_text!r} sets {', '.join(owned)}: these are owned by the entrypoint; "
            + "; ".join(f"{k} -> {OWNED_KEYS[k]}" for k in owned)
        )
    problems = [problem for key, value in data.items() if (problem := yaml_value_problem(key, value))]
    if problems:
        raise ConfigError(f"LLAMAFACTORY_CONFIG={path_text!r}: " + "; ".join(problems))
    return data


def yaml_value_problem(key: str, value: Any) -> str | None:
    """A YAML key that a setting also sets gets that setting's validation (type and bounds); the others are
    type-checked against LLaMA-Factory's own argument classes once it is imported (worker.check_types)."""
    field = FIELDS_BY_LF_KEY.get(key)
    if field is None:
        return None
    if isinstance(value, bool):
        raw = "true" if value else "false"
    elif isinstance(value, (int, float, str)):
        raw = str(value)
    else:
        raw = None
    try:
        if raw is None or (field.kind in ("int", "float") and isinstance(value, bool)):
            raise ValueError
        field.parse(raw)
    except ValueError:
        return f"{key}={value!r} is not valid: expected {field.allowed()}"
    return None


def check_qlora_possible() -> None:
    """QLoRA needs bitsandbytes and a CUDA device; say so here rather than deep inside a library."""
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package is not installed")
    if not glob.glob("/dev/nvidia[0-9]*"):
        missing.append("no CUDA device is visible (no /dev/nvidia*)")
    if missing:
        raise ConfigError(
            "FINETUNING_TYPE=qlora needs a CUDA GPU and bitsandbytes: " + " and ".join(missing)
            + "; use FINETUNING_TYPE=lora on this machine"
        )


def check_deepspeed_possible(args: dict[str, Any], settings: Settings) -> None:
    """DeepSpeed is imported by the training processes only: say here, before anything starts, when it cannot be."""
    where = f"DEEPSPEED={settings.deepspeed}" if settings.deepspeed != "none" else (
        f"deepspeed in LLAMAFACTORY_CONFIG={settings.llamafactory_config!r}")
    if not Path(str(args["deepspeed"])).is_file():
        raise ConfigError(f"{where}: {args['deepspeed']} is not a file")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"{where} needs the deepspeed package (LLaMA-Factory 0.9.3 accepts deepspeed>=0.10.0,<=0.16.9), which "
            "is not installed here: run the project's image, which ships it, or set DEEPSPEED=none"
        )


def check_publishable(base: BaseModel, args: dict[str, Any]) -> None:
    """Refuse now what the merge could not publish as trained, rather than after the GPU hours: training the
    input embedding or the head of a base that ties them, for a model type vLLM always ties."""
    if args.get("finetuning_type") != "lora" or tied_input_embedding(base) is None:
        return
    modules = {m.strip() for key in ("lora_target", "additional_target") for m in str(args.get(key) or "").split(",")}
    if (modules & EMBEDDING_MODULES or args.get("resize_vocab")) and base.config.get("model_type") not in \
            UNTIE_MODEL_TYPES:
        raise ConfigError(f"BASE_MODEL_PATH={str(base.directory)!r}: "
                          + tied_embeddings_problem(base.config.get("model_type")))


def llamafactory_args(settings: Settings, data: datasets.ResolvedDatasets) -> dict[str, Any]:
    """The settings' own arguments (settings.llamafactory_values) and the few this entrypoint derives."""
    s = settings
    args: dict[str, Any] = {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": s.base_model_path,
        "dataset": ",".join(data.names),
        "dataset_dir": str(data.dataset_dir),
        "output_dir": s.lora_output_path,
        "plot_loss": True,
        "overwrite_output_dir": False,
        "report_to": "none",  # tracking is ours: tolerant of MLflow outages, one run per output
        "finetuning_type": "full" if s.finetuning_type == "full" else "lora",
        **llamafactory_values(s),  # precision is resolved to bf16/fp16 flags where torch can see the device
    }
    if s.deepspeed != "none":
        args["deepspeed"] = str(DEEPSPEED_DIR / DEEPSPEED_CONFIGS[s.deepspeed])
    if s.finetuning_type == "qlora":
        args.update(quantization_bit=4, quantization_method="bnb")
    return args


def result_args(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments that shape the trained result: the run's identity."""
    return {k: v for k, v in args.items() if k not in NON_RESULT_KEYS}


def build_plan(settings: Settings) -> TrainPlan:
    """Everything the decision needs, computed without heavy imports and without writing anything."""
    output = Path(settings.lora_output_path)
    base = check_trainable_base(Path(settings.base_model_path))
    overrides = read_yaml_overrides(settings)
    data = datasets.resolve(
        Path(settings.dataset_path),
        settings.dataset,
        settings.dataset_format,
        generated_dir=output / STATE_DIR / "dataset_info",
    )
    args = llamafactory_args(settings, data)
    args.update(overrides)
    if args.get("quantization_bit") is not None and settings.finetuning_type != "full":
        check_qlora_possible()
    if args.get("deepspeed"):
        check_deepspeed_possible(args, settings)
    check_publishable(base, args)
    inputs = {
        "args": result_args(args),
        "model": model_identity(Path(settings.base_model_path)),
        "data": data.identity(),
    }
    return TrainPlan(settings, output, args, digest(inputs), inputs, data, base)
