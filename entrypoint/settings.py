"""The one typed settings object, built from the environment and validated before anything heavy.

Each setting is one field of `Settings`: its Python type is the annotation, and its metadata (`Option`)
says everything else about it once: the environment name, the default as the ConfigMap writes it, the
bounds, whether it lives in the ConfigMap, the Secret or the pod spec, the LLaMA-Factory argument it
becomes, and whether it changes the trained result (and so the run's identity). The LLaMA-Factory
arguments (plan.py), the run identity, base/llm-config.env and the README reference are all derived
from these fields: adding an option is adding a field.

This module is also the one place that reads the process environment (`load_settings`, `process_env`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import textwrap
import typing
import urllib.parse
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Literal

from entrypoint.errors import ConfigError

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")  # dataset names, LoRA adapter names
DNS_LABEL_MAX = 63

Source = Literal["configmap", "secret", "pod"]
LoraTypes = ("lora", "qlora")


@dataclasses.dataclass(frozen=True)
class Option:
    """What a field of Settings is, besides its type: one environment variable and where it goes."""

    env: str
    default: str  # as the ConfigMap writes it; parsed like any value
    doc: str
    group: str  # paths | data | training | lora | tracking | runtime | distributed | merge | webui |
    # scheduling | job | vllm
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    path: bool = False  # an absolute path, normalised
    optional: bool = False  # a number that may be empty: derived later (see _derive_topology)
    source: Source = "configmap"  # where a pod gets it: the llm-config ConfigMap, the Secret, or the pod spec
    lf_key: str = ""  # the LLaMA-Factory argument it sets
    lf_omit: tuple[Any, ...] = ()  # values that leave the LLaMA-Factory argument out (its own default applies)
    lf_for: tuple[str, ...] = ()  # FINETUNING_TYPEs the argument applies to (empty: all)
    result: bool = False  # changes the trained result: part of the run's identity
    # Kubeflow Trainer's name for the same value (PET_*), read when this variable is unset or empty, so the
    # image runs unchanged under a TrainJob or PyTorchJob. Precedence: this variable > the PET_ one > default.
    kubeflow: str = ""
    # Filled in from the Settings field it describes.
    attr: str = ""
    kind: str = ""  # str | int | float | bool | choice | list
    choices: tuple[str, ...] = ()

    @property
    def configmap(self) -> bool:
        return self.source == "configmap"

    @property
    def secret(self) -> bool:
        return self.source == "secret"

    def allowed(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind in ("int", "float"):
            word = "an integer" if self.kind == "int" else "a number"
            lo = "" if self.minimum is None else (">" if self.exclusive_minimum else ">=") + f" {_fmt(self.minimum)}"
            hi = "" if self.maximum is None else f"<= {_fmt(self.maximum)}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            return f"{word} {bounds}".strip() + (", or empty" if self.optional else "")
        if self.path:
            return "an absolute path"
        if self.kind == "list":
            return "a comma-separated list of names" + (", or empty" if self.optional else "")
        return "a string"

    def parse(self, raw: str) -> Any:
        """The typed value of one raw string; ValueError when it is not allowed."""
        value = raw.strip()
        if self.kind == "bool":
            if value.lower() in TRUE:
                return True
            if value.lower() in FALSE:
                return False
            raise ValueError
        if self.kind == "choice":
            for choice in self.choices:
                if value.lower() == choice.lower():
                    return choice
            raise ValueError
        if self.kind in ("int", "float"):
            number: float = int(value, 10) if self.kind == "int" else float(value)
            if not math.isfinite(number):
                raise ValueError
            if self.minimum is not None and (
                number < self.minimum or (self.exclusive_minimum and number == self.minimum)
            ):
                raise ValueError
            if self.maximum is not None and number > self.maximum:
                raise ValueError
            return number
        if self.kind == "list":
            items = tuple(item.strip() for item in value.split(",") if item.strip())
            if not items or any(not NAME_RE.match(item) for item in items):
                raise ValueError
            return items
        if self.path:
            if not value.startswith("/") or "\x00" in value:
                raise ValueError
            return os.path.normpath(value)
        return value


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def option(env: str, default: str, doc: str, group: str, **meta: Any) -> Any:
    """A Settings field described by an Option (no Python default: values come from load_settings)."""
    return dataclasses.field(metadata={"option": Option(env, default, doc, group, **meta)})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated configuration; attribute names are the variables' names in lower case."""

    # Storage layout (the original design's keys).
    base_model_path: str = option(
        "BASE_MODEL_PATH", "/storage/models/base-model",
        "Base model directory on NFS (Hugging Face layout with config.json).", "paths", path=True, result=True)
    lora_output_path: str = option(
        "LORA_OUTPUT_PATH", "/storage/output/lora-adapter",
        "Where training writes its adapter (or full weights), checkpoints and completion marker.", "paths",
        path=True)
    merged_model_path: str = option(
        "MERGED_MODEL_PATH", "/storage/models/merged-model",
        "Symlink the merge publishes; the external vLLM reads this path.", "paths", path=True)
    dataset_path: str = option(
        "DATASET_PATH", "/storage/data",
        "Directory holding the datasets (and optionally dataset_info.json). Never written to.", "paths", path=True)
    # Data.
    dataset: tuple[str, ...] = option(
        "DATASET", "train_data",
        "Datasets to train on: names from DATASET_PATH/dataset_info.json, or file names in DATASET_PATH "
        "(.json/.jsonl) when there is no dataset_info.json.", "data", result=True)
    dataset_format: Literal["auto", "alpaca", "sharegpt"] = option(
        "DATASET_FORMAT", "auto", "Format of dataset files that have no dataset_info.json entry.", "data",
        result=True)
    max_samples: int = option(
        "MAX_SAMPLES", "0", "Use at most this many records per dataset (0: all).", "data", minimum=0,
        lf_key="max_samples", lf_omit=(0,), result=True)
    # Training.
    finetuning_type: Literal["lora", "qlora", "full"] = option(
        "FINETUNING_TYPE", "lora", "lora, qlora (LoRA on a 4-bit bitsandbytes base; needs CUDA) or full.",
        "training", result=True)
    template: str = option(
        "TEMPLATE", "llama3", "LLaMA-Factory chat template of the base model.", "training", lf_key="template",
        result=True)
    cutoff_len: int = option(
        "CUTOFF_LEN", "2048", "Maximum tokens per training example.", "training", minimum=8, maximum=1048576,
        lf_key="cutoff_len", result=True)
    batch_size: int = option(
        "BATCH_SIZE", "1", "Per-device train batch size.", "training", minimum=1, maximum=4096,
        lf_key="per_device_train_batch_size", result=True)
    gradient_accumulation: int = option(
        "GRADIENT_ACCUMULATION", "8", "Gradient accumulation steps.", "training", minimum=1, maximum=65536,
        lf_key="gradient_accumulation_steps", result=True)
    learning_rate: float = option(
        "LEARNING_RATE", "1.0e-4", "Peak learning rate.", "training", minimum=0, maximum=1, exclusive_minimum=True,
        lf_key="learning_rate", result=True)
    num_epochs: float = option(
        "NUM_EPOCHS", "3", "Training epochs (ignored when MAX_STEPS > 0).", "training", minimum=0, maximum=10000,
        exclusive_minimum=True, lf_key="num_train_epochs", result=True)
    max_steps: int = option(
        "MAX_STEPS", "0", "Stop after this many optimizer steps (0: use NUM_EPOCHS).", "training", minimum=0,
        lf_key="max_steps", lf_omit=(0,), result=True)
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup", "inverse_sqrt"] = option(
        "LR_SCHEDULER", "cosine", "Learning-rate schedule.", "training", lf_key="lr_scheduler_type", result=True)
    warmup_ratio: float = option(
        "WARMUP_RATIO", "0.0", "Fraction of steps used for warm-up.", "training", minimum=0, maximum=1,
        lf_key="warmup_ratio", result=True)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "PRECISION", "auto",
        "Compute precision; auto picks bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU.",
        "training", lf_key="precision", result=True)
    seed: int = option(
        "SEED", "42", "Start value of the random number generators (data shuffling, the validation split, LoRA "
        "initialisation).", "training", minimum=0, lf_key="seed", result=True)
    neftune_noise_alpha: float = option(
        "NEFTUNE_NOISE_ALPHA", "0", "NEFTune: noise added to the input embeddings while training, scaled by this "
        "alpha (5 is the paper's common choice; 0: off).", "training", minimum=0, maximum=100,
        lf_key="neftune_noise_alpha", lf_omit=(0,), result=True)
    save_steps: int = option(
        "SAVE_STEPS", "100", "Checkpoint every this many steps: what a resume after preemption starts from.",
        "training", minimum=1, lf_key="save_steps")
    save_minutes: int = option(
        "SAVE_MINUTES", "0", "Also checkpoint once this many minutes have passed since the last checkpoint, "
        "whatever the step time: at most this much training is lost to a preemption (0: SAVE_STEPS only; "
        "components/spot sets 10).", "training", minimum=0, maximum=10080)
    save_total_limit: int = option(
        "SAVE_TOTAL_LIMIT", "3", "Keep at most this many checkpoints (0: keep all).", "training", minimum=0,
        lf_key="save_total_limit", lf_omit=(0,))
    logging_steps: int = option(
        "LOGGING_STEPS", "10", "Log loss and learning rate every this many steps.", "training", minimum=1,
        lf_key="logging_steps")
    trust_remote_code: bool = option(
        "TRUST_REMOTE_CODE", "false", "Run the Python code a base model ships (config.json auto_map) for a model type "
        "transformers does not know. Only for models whose code you have read: it runs in every training pod.",
        "training", lf_key="trust_remote_code")
    llamafactory_config: str = option(
        "LLAMAFACTORY_CONFIG", "",
        "Optional LLaMA-Factory YAML for advanced options; its keys override the variables above "
        "(paths, dataset and output keys stay owned by the entrypoint).", "training")
    # LoRA.
    lora_rank: int = option(
        "LORA_RANK", "8", "LoRA rank.", "lora", minimum=1, maximum=1024, lf_key="lora_rank", lf_for=LoraTypes,
        result=True)
    lora_alpha: int = option(
        "LORA_ALPHA", "16", "LoRA alpha (scale = alpha / rank).", "lora", minimum=1, maximum=65536,
        lf_key="lora_alpha", lf_for=LoraTypes, result=True)
    lora_dropout: float = option(
        "LORA_DROPOUT", "0.0", "LoRA dropout.", "lora", minimum=0, maximum=0.9, lf_key="lora_dropout",
        lf_for=LoraTypes, result=True)
    lora_target: tuple[str, ...] = option(
        "LORA_TARGET", "all", "Modules LoRA adapts: all, or names such as q_proj,v_proj.", "lora",
        lf_key="lora_target", lf_for=LoraTypes, result=True)
    use_rslora: bool = option(
        "USE_RSLORA", "false", "Rank-stabilised LoRA (scale = alpha / sqrt(rank)).", "lora", lf_key="use_rslora",
        lf_for=LoraTypes, result=True)
    # Tracking.
    tracking: Literal["mlflow", "none"] = option(
        "TRACKING", "mlflow", "mlflow, or none to train without tracking (a warning says so).", "tracking")
    mlflow_tracking_uri: str = option(
        "MLFLOW_TRACKING_URI", "", "MLflow server (from the mlflow-config Secret).", "tracking", source="secret")
    mlflow_experiment_name: str = option(
        "MLFLOW_EXPERIMENT_NAME", "llama-factory", "MLflow experiment for runs.", "tracking")
    mlflow_timeout_seconds: float = option(
        "MLFLOW_TIMEOUT_SECONDS", "10", "How long the start-up check waits for MLflow.", "tracking", minimum=0.1,
        maximum=600)
    # Behaviour on storage.
    replace_output: bool = option(
        "REPLACE_OUTPUT", "false",
        "Move an existing output made with another config (or not made by this tool) aside, to "
        "<path>.replaced-<time>, and train anew. Nothing is deleted.", "runtime")
    checkpoint_on_sigterm: Literal["auto", "true", "false"] = option(
        "CHECKPOINT_ON_SIGTERM", "auto",
        "Save a checkpoint when SIGTERM arrives; auto: for LoRA/QLoRA only (full checkpoints rarely fit "
        "in a spot VM's 15 s notice).", "runtime")
    termination_grace_seconds: int = option(
        "TERMINATION_GRACE_SECONDS", "15", "Seconds the pod has after SIGTERM (its terminationGracePeriodSeconds; "
        "GKE Spot grants 15): the entrypoint saves a checkpoint, writes its exit reason and flushes MLflow within it, "
        "leaving a few seconds' margin.", "runtime", minimum=5, maximum=3600)
    lock_ttl_seconds: int = option(
        "LOCK_TTL_SECONDS", "120", "The output lock expires this long after its holder's last heartbeat; then "
        "another run may take it over.", "runtime", minimum=10, maximum=86400)
    lock_wait_seconds: int = option(
        "LOCK_WAIT_SECONDS", "300", "How long a run waits for a lock held by another run before exiting with the "
        "retriable code.", "runtime", minimum=0, maximum=86400)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = option("LOG_LEVEL", "INFO", "Log level.", "runtime")
    termination_log_path: str = option(
        "TERMINATION_LOG_PATH", "/dev/termination-log", "Where the one-line exit reason is written.", "runtime")
    # Distributed training: torchrun across the pods of components/multinode (or a Kubeflow TrainJob).
    nproc_per_node: str = option(
        "NPROC_PER_NODE", "auto", "Training processes per pod: auto (one per visible GPU) or a number.",
        "distributed")
    nnodes: int = option(
        "NNODES", "", "Pods (nodes) that train together; components/multinode runs the Job with this many pods. "
        "Empty: Kubeflow Trainer's PET_NNODES, else 1.", "distributed", minimum=1, maximum=1024, optional=True,
        kubeflow="PET_NNODES")
    node_rank: int = option(
        "NODE_RANK", "", "This pod's node rank (0: the one that locks, tracks and marks the output). "
        "Empty: PET_NODE_RANK, else JOB_COMPLETION_INDEX, else 0.", "distributed", minimum=0, maximum=1023,
        optional=True, source="pod", kubeflow="PET_NODE_RANK")
    master_addr: str = option(
        "MASTER_ADDR", "", "Address of node rank 0, where torchrun meets (required when NNODES > 1). "
        "Empty: PET_MASTER_ADDR, else <JOB_NAME>-0.<MULTINODE_SERVICE>, the stable DNS name of the Indexed "
        "Job's first pod.", "distributed", kubeflow="PET_MASTER_ADDR")
    master_port: int = option(
        "MASTER_PORT", "29500", "Port of torchrun's rendezvous on node rank 0 (when NNODES > 1). "
        "Kubeflow Trainer's PET_MASTER_PORT applies when this is empty.", "distributed", minimum=1024,
        maximum=65535, kubeflow="PET_MASTER_PORT")
    ddp_timeout: int = option(
        "DDP_TIMEOUT", "1800", "Seconds a rank waits for the others (pods starting late, rank 0 tokenizing the "
        "dataset, a collective) before the attempt fails; also how long a node that vanished without closing its "
        "connections stalls the rest.", "distributed", minimum=10, maximum=604800, lf_key="ddp_timeout")
    deepspeed: Literal["none", "zero2", "zero3"] = option(
        "DEEPSPEED", "none", "DeepSpeed ZeRO for multi-GPU training: zero2 shards optimizer state and gradients, "
        "zero3 also the weights (for models whose weights do not fit one GPU). Needs the deepspeed package; always "
        "runs under torchrun.", "distributed")
    multinode_service: str = option(
        "MULTINODE_SERVICE", "", "Headless Service giving the training pods stable DNS names "
        "(components/multinode); names node 0 for MASTER_ADDR.", "distributed", source="pod")
    job_completion_index: int | None = option(
        "JOB_COMPLETION_INDEX", "", "Index of this pod in an Indexed Job (set by Kubernetes); NODE_RANK defaults "
        "to it.", "distributed", minimum=0, maximum=1023, optional=True, source="pod")
    # Merge and publish.
    merge_keep_versions: int = option(
        "MERGE_KEEP_VERSIONS", "2", "Published merged-model versions kept (the current one included).", "merge",
        minimum=1, maximum=100)
    adapter_wait_seconds: int = option(
        "ADAPTER_WAIT_SECONDS", "0", "How long the merge waits for training's completion marker (0: fail at once "
        "when the adapter is not complete).", "merge", minimum=0, maximum=604800)
    merge_unmarked_adapter: bool = option(
        "MERGE_UNMARKED_ADAPTER", "false", "Merge an output that has no completion marker of this tool (an adapter "
        "trained elsewhere and copied to LORA_OUTPUT_PATH): its files are checked, but not that training finished "
        "or which base it was trained on.", "merge")
    registered_model_name: str = option(
        "REGISTERED_MODEL_NAME", "", "Register each published merge under this MLflow model name (empty: no "
        "registration).", "merge")
    publish_gate: Literal["strict", "warn", "off"] = option(
        "PUBLISH_GATE", "strict", "Checks of a merged model before it is published (finite tensors, the adapter "
        "changed the weights, tokenizer/template/stop tokens, greedy probes equal to base+adapter and stopping): "
        "strict refuses to publish on a failed check (exit 78), warn publishes and logs it, off skips them.",
        "merge")
    publish_gate_probe_tokens: int = option(
        "PUBLISH_GATE_PROBE_TOKENS", "64", "New tokens each probe prompt may generate before it must have stopped "
        "at a stop token.", "merge", minimum=1, maximum=4096)
    publish_gate_probe_seconds: float = option(
        "PUBLISH_GATE_PROBE_SECONDS", "300", "Time the probe's generations may take in all; a prompt it cuts "
        "short before a stop token leaves the stop check not verified (reported as skipped, never failed).",
        "merge", minimum=1, maximum=86400)
    eval_dataset: tuple[str, ...] | None = option(
        "EVAL_DATASET", "", "Held-out datasets (named as in DATASET) the publish gate takes its probe prompts "
        "and PUBLISH_GATE_MAX_EVAL_LOSS's records from. Empty: probe prompts from the training data, no loss "
        "bar.", "merge", optional=True)
    publish_gate_max_eval_loss: str = option(
        "PUBLISH_GATE_MAX_EVAL_LOSS", "", "Quality bar on EVAL_DATASET: the merged model's mean loss per "
        "response token must be at most this number, or at most the base model's (base). Empty: no bar.",
        "merge")
    publish_gate_eval_records: int = option(
        "PUBLISH_GATE_EVAL_RECORDS", "64", "EVAL_DATASET records (its first) the loss bar scores.", "merge",
        minimum=1, maximum=100000)
    publish_gate_probe_max_gib: float = option(
        "PUBLISH_GATE_PROBE_MAX_GIB", "6", "Largest model (weights, GiB) the generation probe loads; it holds one "
        "copy at a time. Larger models skip the probe (the streamed checks still run). Before merging, a model "
        "the probe would load that cannot fit the Job's memory limit is refused under PUBLISH_GATE=strict "
        "(exit 78), and skips the probe under warn.", "merge", minimum=0)
    # WebUI (LLaMA Board).
    webui_port: int = option(
        "WEBUI_PORT", "7860", "Port LLaMA Board listens on inside the pod.", "webui", minimum=1024, maximum=65535)
    webui_workdir: str = option(
        "WEBUI_WORKDIR", "/storage/webui", "Working directory of the WebUI on NFS: its saves/, cache and config "
        "land there.", "webui", path=True)
    # Scheduling (read by the manifests, kept here so the ConfigMap documents one place).
    kueue_queue: str = option(
        "KUEUE_QUEUE", "llama-factory", "Kueue LocalQueue the training and merge Jobs are submitted to "
        "(components/kueue labels them with it); unused without that component.", "scheduling")
    # Identity of the pod (downward API and image): MLflow tags, and node 0's name in a multi-node Job.
    job_name: str = option(
        "JOB_NAME", "", "Kubernetes Job name (downward API); with MULTINODE_SERVICE it names node 0.", "job",
        source="pod")
    pod_name: str = option("POD_NAME", "", "Pod name (downward API).", "job", source="pod")
    image: str = option("IMAGE", "", "Image reference the pod runs.", "job", source="pod")
    # For the external vLLM (read by it, kept here so the ConfigMap documents one place).
    served_model_name: str = option("SERVED_MODEL_NAME", "merged-model", "Model name the external vLLM serves.",
                                    "vllm")
    max_model_len: int = option("MAX_MODEL_LEN", "4096", "vLLM --max-model-len.", "vllm", minimum=1)
    tensor_parallel_size: int = option("TENSOR_PARALLEL_SIZE", "1", "vLLM --tensor-parallel-size.", "vllm",
                                       minimum=1, maximum=64)
    vllm_url: str = option(
        "VLLM_URL", "", "A running vLLM (http://host:8000) the merge hands each published adapter to: loaded at "
        "runtime as <SERVED_MODEL_NAME>-vNNNN, the previous one unloaded (vLLM needs --enable-lora and "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). Empty: no hand-off.", "vllm")
    vllm_api_key: str = option("VLLM_API_KEY", "", "vLLM's --api-key, sent as a bearer token by the hand-off.",
                               "vllm", source="secret")

    def public(self) -> dict[str, Any]:
        """Everything but secrets: safe for logs and MLflow params."""
        return {f.env: getattr(self, f.attr) for f in FIELDS if not f.secret}


def _kind(annotation: Any) -> tuple[str, tuple[str, ...]]:
    """(kind, choices) of a field's annotation."""
    if typing.get_origin(annotation) is Literal:
        return "choice", tuple(typing.get_args(annotation))
    if annotation in (int, int | None):
        return "int", ()
    if annotation in (float, float | None):
        return "float", ()
    if annotation is bool:
        return "bool", ()
    if annotation in (tuple[str, ...], tuple[str, ...] | None):
        return "list", ()
    if annotation is str:
        return "str", ()
    raise TypeError(f"Settings field of unsupported type {annotation!r}")


def _bind_options() -> tuple[Option, ...]:
    hints = typing.get_type_hints(Settings)
    bound = []
    for field in dataclasses.fields(Settings):
        kind, choices = _kind(hints[field.name])
        bound.append(dataclasses.replace(field.metadata["option"], attr=field.name, kind=kind, choices=choices))
    return tuple(bound)


FIELDS: tuple[Option, ...] = _bind_options()
# Every variable the entrypoint reads, Kubeflow Trainer's names included, to the field it sets.
FIELDS_BY_ENV = {**{f.kubeflow: f for f in FIELDS if f.kubeflow}, **{f.env: f for f in FIELDS}}
FIELDS_BY_ATTR = {f.attr: f for f in FIELDS}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Parse and validate every field; raise one ConfigError that lists every problem found."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    problems: list[str] = []
    for field in FIELDS:
        name, raw = field.env, env.get(field.env)
        if _unset(raw) and field.kubeflow and not _unset(env.get(field.kubeflow)):
            name, raw = field.kubeflow, env[field.kubeflow]
        if raw is None or (raw.strip() == "" and field.kind != "str"):
            raw = field.default
        if field.optional and raw.strip() == "":
            values[field.attr] = None
            continue
        try:
            values[field.attr] = field.parse(raw)
        except ValueError:
            shown = "<hidden>" if field.secret else repr(raw)
            problems.append(f"{name}={shown} is not valid: expected {field.allowed()}")
    for check in _CROSS_CHECKS:
        if not problems:
            message = check(values)
            if message:
                problems.append(message)
    if problems:
        raise ConfigError("; ".join(problems))
    _derive_topology(values)
    return Settings(**values)


def early_value(attr: str, env: Mapping[str, str] | None = None) -> str:
    """One setting's raw value (or its default) before the whole configuration is validated: what the CLI
    needs to report a configuration error (log level, termination log path)."""
    env = os.environ if env is None else env
    field = FIELDS_BY_ATTR[attr]
    raw = env.get(field.env, "")
    return raw.strip() or field.default


@dataclasses.dataclass(frozen=True)
class ProcessEnv:
    """What torchrun tells each training process about itself."""

    rank: int
    local_rank: int
    world_size: int


def process_env(env: Mapping[str, str] | None = None) -> ProcessEnv:
    env = os.environ if env is None else env
    return ProcessEnv(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1")))


def mlflow_client_env(settings: Settings) -> dict[str, str]:
    """What MLflow's client reads only from the environment: bounded HTTP calls (its defaults retry for
    minutes against a dead server), and credentials given inside MLFLOW_TRACKING_URI, which move to MLflow's
    own variables so that the URI MLflow prints carries none (tracking.client_uri strips them)."""
    env = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(settings.mlflow_timeout_seconds))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    }
    parts = urllib.parse.urlsplit(settings.mlflow_tracking_uri)
    if parts.username or parts.password:
        env["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username or "")
        env["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password or "")
    return env


def apply_library_env(settings: Settings, environ: MutableMapping[str, str] | None = None) -> None:
    """Hand the libraries that read only the environment what the settings say; values already set win.
    Called once, at start (cli.main), before any of them is imported."""
    environ = os.environ if environ is None else environ
    for key, value in mlflow_client_env(settings).items():
        environ.setdefault(key, value)


def _unset(raw: str | None) -> bool:
    return raw is None or raw.strip() == ""


def _check_nproc(values: dict[str, Any]) -> str | None:
    raw = values["nproc_per_node"]
    if raw != "auto" and not (raw.isdigit() and 1 <= int(raw) <= 64):
        return f"NPROC_PER_NODE={raw!r} is not valid: expected auto or an integer from 1 to 64"
    return None


def _check_tracking(values: dict[str, Any]) -> str | None:
    if values["tracking"] == "mlflow" and not values["mlflow_tracking_uri"]:
        return (
            "MLFLOW_TRACKING_URI is empty while TRACKING=mlflow: set it in the mlflow-config Secret, "
            "or set TRACKING=none to train without tracking"
        )
    return None


MLFLOW_URI_FORMS = "http(s)://host[:port][/path], file:///path, sqlite:////path/mlflow.db or an absolute path"


def _check_mlflow_uri(values: dict[str, Any]) -> str | None:
    """A malformed tracking URI is a configuration error before anything runs, not a traceback mid-start."""
    uri = values["mlflow_tracking_uri"].strip()
    if values["tracking"] != "mlflow" or not uri:
        return None
    from entrypoint.tracking import redact_uri

    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port  # raises ValueError when out of range or not a number
        shown = redact_uri(uri)
    except ValueError as exc:
        return f"MLFLOW_TRACKING_URI is not a valid URI ({exc}): expected {MLFLOW_URI_FORMS}"
    scheme = parts.scheme.lower()
    if scheme in ("http", "https") and parts.hostname and port != 0:
        return None
    if scheme in ("file", "sqlite") and parts.path.startswith("/") and not parts.netloc:
        return None
    if not scheme and uri.startswith("/"):
        return None
    why = "has no host" if scheme in ("http", "https") else (
        f"scheme {scheme!r} is not supported" if scheme else "is neither a URL nor an absolute path")
    return f"MLFLOW_TRACKING_URI={shown!r} {why}: expected {MLFLOW_URI_FORMS}"


def _check_paths_distinct(values: dict[str, Any]) -> str | None:
    out = values["lora_output_path"]
    for other in ("base_model_path", "dataset_path", "merged_model_path"):
        path = values[other]
        if out == path or out.startswith(path + "/") or path.startswith(out + "/"):
            return (
                f"LORA_OUTPUT_PATH={out!r} overlaps {other.upper()}={path!r}: the output must be a "
                "directory of its own, outside the model and the data"
            )
    return None


def _derive_topology(values: dict[str, Any]) -> None:
    """Fill in what the pod did not say explicitly. Silent: only training needs a complete topology (the merge
    Job and the WebUI read the same ConfigMap), and check_topology says what is missing."""
    values["nnodes"] = values["nnodes"] or 1
    if values["node_rank"] is None:
        index = values["job_completion_index"]
        values["node_rank"] = 0 if index is None else index
    job, service = values["job_name"], values["multinode_service"]
    # An Indexed Job's pods are named <job>-<index> and, with `subdomain`, resolve as <job>-<index>.<service>.
    if not values["master_addr"] and job and service and len(f"{job}-0") <= DNS_LABEL_MAX:
        values["master_addr"] = f"{job}-0.{service}"


def check_topology(settings: Settings) -> None:
    """What training needs to find its peers: a node rank below NNODES and, with several nodes, node 0's address."""
    nnodes, rank = settings.nnodes, settings.node_rank
    if rank >= nnodes:
        index = settings.job_completion_index
        raise ConfigError(
            f"node rank {rank} (NODE_RANK, else PET_NODE_RANK, else JOB_COMPLETION_INDEX"
            f"{'' if index is None else '=' + str(index)}) is not below NNODES={nnodes}: node ranks run from 0 to "
            "NNODES-1, so an Indexed Job's completions must equal NNODES (components/multinode takes both from "
            "NNODES)"
        )
    if nnodes == 1 or settings.master_addr:
        return
    job, service = settings.job_name, settings.multinode_service
    if job and service:
        raise ConfigError(
            f"JOB_NAME={job!r} is too long for a multi-node Job: its pods' host names ({job}-<index>) must fit "
            f"a {DNS_LABEL_MAX}-character DNS label; use a shorter Job name or set MASTER_ADDR"
        )
    raise ConfigError(
        f"MASTER_ADDR is empty while NNODES={nnodes}: every node must reach node 0. Run the Job of "
        "components/multinode (overlays/multinode), which derives it from JOB_NAME and MULTINODE_SERVICE; "
        "under Kubeflow Trainer PET_MASTER_ADDR provides it; otherwise set MASTER_ADDR to node 0's address"
    )


def _check_eval_loss(values: dict[str, Any]) -> str | None:
    raw = values["publish_gate_max_eval_loss"].strip()
    if raw.lower() == "base":
        raw = "base"
    elif raw:
        try:
            bound = float(raw)
        except ValueError:
            bound = math.nan
        if not (math.isfinite(bound) and bound > 0):
            return (f"PUBLISH_GATE_MAX_EVAL_LOSS={raw!r} is not valid: expected a number > 0, base (not worse than "
                    "the base model), or empty (no bar)")
    values["publish_gate_max_eval_loss"] = raw
    if raw and not values["eval_dataset"]:
        return (f"PUBLISH_GATE_MAX_EVAL_LOSS={raw!r} needs EVAL_DATASET: the held-out datasets the loss is measured "
                "on (named as in DATASET)")
    return None


_CROSS_CHECKS: tuple[Callable[[dict[str, Any]], str | None], ...] = (
    _check_nproc,
    _check_tracking,
    _check_mlflow_uri,
    _check_paths_distinct,
    _check_eval_loss,
)


def llamafactory_values(settings: Settings) -> dict[str, Any]:
    """The LLaMA-Factory arguments the fields map to directly (plan.py adds the derived ones)."""
    args: dict[str, Any] = {}
    for field in FIELDS:
        if not field.lf_key or (field.lf_for and settings.finetuning_type not in field.lf_for):
            continue
        value = getattr(settings, field.attr)
        if value in field.lf_omit:
            continue
        args[field.lf_key] = ",".join(value) if field.kind == "list" else value
    return args


def non_result_lf_keys() -> set[str]:
    """LLaMA-Factory arguments set from fields that do not change the trained result."""
    return {f.lf_key for f in FIELDS if f.lf_key and not f.result}


def default_configmap() -> dict[str, str]:
    """The ConfigMap data this table implies (what base/ must carry)."""
    return {f.env: f.default for f in FIELDS if f.configmap}


def configmap_env_text() -> str:
    """base/llm-config.env: every ConfigMap variable with its default, each under its comment."""
    lines = [
        "# The unified configuration (ConfigMap llm-config): every variable the entrypoint reads, with",
        "# its default. GENERATED from entrypoint/settings.py (Settings); do not edit by hand. After changing",
        "# a setting run `invoke generate` and review the diff.",
        "# Overlays change values with a configMapGenerator `behavior: merge` entry.",
    ]
    group = None
    for field in FIELDS:
        if not field.configmap:
            continue
        if field.group != group:
            group = field.group
            lines += ["", f"# --- {group} ---"]
        comment = f"{field.doc} Allowed: {field.allowed()}."
        lines += textwrap.wrap(comment, width=108, initial_indent="# ", subsequent_indent="# ")
        lines.append(f"{field.env}={field.default}")
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """The configuration reference table for README.md."""
    rows = ["| Variable | Default | Allowed | Description |", "|---|---|---|---|"]
    for f in FIELDS:
        default = f"`{f.default}`" if f.default else "(empty)"
        where = "" if f.configmap else " *(not in the ConfigMap: " + (
            "Secret" if f.secret else "set by the pod spec") + ")*"
        rows.append(f"| `{f.env}` | {default} | {f.allowed()} | {f.doc}{where} |")
    return "\n".join(rows)
