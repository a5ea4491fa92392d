"""The one typed settings object, built from the environment and validated before anything heavy.

Every variable the entrypoint reads is declared once in FIELDS. The same table generates the
configuration reference in README.md and is compared with the base ConfigMap by the tests, so the
code, the docs and the cluster never drift apart. Nothing else in the package reads os.environ for
configuration.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

from entrypoint.errors import ConfigError

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")

FINETUNING_TYPES = ("lora", "qlora", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DATASET_FORMATS = ("auto", "alpaca", "sharegpt")
TRACKING_MODES = ("mlflow", "none")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CHECKPOINT_ON_SIGTERM = ("auto", "true", "false")
DEEPSPEED_STAGES = ("none", "zero2", "zero3")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
DNS_LABEL_MAX = 63


@dataclasses.dataclass(frozen=True)
class Field:
    """One environment variable: how to parse it, what is allowed, where it belongs."""

    env: str
    kind: str  # str | int | float | bool | choice | path | list
    default: str
    doc: str
    group: str  # paths | data | training | lora | tracking | runtime | distributed | merge | webui | job | vllm
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    fingerprint: bool = False  # changes the trained result: part of the run's identity
    configmap: bool = True  # listed in the base ConfigMap (False: Secret, downward API, image)
    secret: bool = False  # never logged, never sent to MLflow
    # Kubeflow Trainer's name for the same value (PET_*), read when this variable is unset or empty, so the
    # image runs unchanged under a TrainJob or PyTorchJob. Precedence: this variable > the PET_ one > default.
    kubeflow: str = ""

    @property
    def attr(self) -> str:
        return self.env.lower()

    def allowed(self) -> str:
        if self.kind in ("choice",):
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind in ("int", "float"):
            word = "an integer" if self.kind == "int" else "a number"
            lo = "" if self.minimum is None else (">" if self.exclusive_minimum else ">=") + f" {_fmt(self.minimum)}"
            hi = "" if self.maximum is None else f"<= {_fmt(self.maximum)}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            return f"{word} {bounds}".strip() + (", or empty" if self.optional else "")
        if self.kind == "path":
            return "an absolute path"
        if self.kind == "list":
            return "a comma-separated list of names"
        return "a string"

    @property
    def optional(self) -> bool:
        """A number without a default: empty means "not set here", and the value is derived (see _derive_topology)."""
        return self.kind in ("int", "float") and self.default == ""


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


F = Field
FIELDS: tuple[Field, ...] = (
    # Storage layout (the seed's keys).
    F("BASE_MODEL_PATH", "path", "/storage/models/base-model",
      "Base model directory on NFS (Hugging Face layout with config.json).", "paths", fingerprint=True),
    F("LORA_OUTPUT_PATH", "path", "/storage/output/lora-adapter",
      "Where training writes its adapter (or full weights), checkpoints and completion marker.", "paths"),
    F("MERGED_MODEL_PATH", "path", "/storage/models/merged-model",
      "Symlink the merge publishes; the external vLLM reads this path.", "paths"),
    F("DATASET_PATH", "path", "/storage/data",
      "Directory holding the datasets (and optionally dataset_info.json). Never written to.", "paths"),
    # Data.
    F("DATASET", "list", "train_data",
      "Datasets to train on: names from DATASET_PATH/dataset_info.json, or file names in DATASET_PATH "
      "(.json/.jsonl) when there is no dataset_info.json.", "data", fingerprint=True),
    F("DATASET_FORMAT", "choice", "auto",
      "Format of dataset files that have no dataset_info.json entry.", "data", choices=DATASET_FORMATS,
      fingerprint=True),
    F("MAX_SAMPLES", "int", "0", "Use at most this many records per dataset (0: all).", "data",
      minimum=0, fingerprint=True),
    # Training.
    F("FINETUNING_TYPE", "choice", "lora",
      "lora, qlora (LoRA on a 4-bit bitsandbytes base; needs CUDA) or full.", "training",
      choices=FINETUNING_TYPES, fingerprint=True),
    F("TEMPLATE", "str", "llama3", "LLaMA-Factory chat template of the base model.", "training",
      fingerprint=True),
    F("CUTOFF_LEN", "int", "2048", "Maximum tokens per training example.", "training",
      minimum=8, maximum=1048576, fingerprint=True),
    F("BATCH_SIZE", "int", "1", "Per-device train batch size.", "training", minimum=1, maximum=4096,
      fingerprint=True),
    F("GRADIENT_ACCUMULATION", "int", "8", "Gradient accumulation steps.", "training", minimum=1,
      maximum=65536, fingerprint=True),
    F("LEARNING_RATE", "float", "1.0e-4", "Peak learning rate.", "training", minimum=0, maximum=1,
      exclusive_minimum=True, fingerprint=True),
    F("NUM_EPOCHS", "float", "3", "Training epochs (ignored when MAX_STEPS > 0).", "training", minimum=0,
      maximum=10000, exclusive_minimum=True, fingerprint=True),
    F("MAX_STEPS", "int", "0", "Stop after this many optimizer steps (0: use NUM_EPOCHS).", "training",
      minimum=0, fingerprint=True),
    F("LR_SCHEDULER", "choice", "cosine", "Learning-rate schedule.", "training", choices=LR_SCHEDULERS,
      fingerprint=True),
    F("WARMUP_RATIO", "float", "0.0", "Fraction of steps used for warm-up.", "training", minimum=0,
      maximum=1, fingerprint=True),
    F("PRECISION", "choice", "auto",
      "Compute precision; auto picks bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU.",
      "training", choices=PRECISIONS, fingerprint=True),
    F("SEED", "int", "42", "Random seed.", "training", minimum=0, fingerprint=True),
    F("SAVE_STEPS", "int", "100", "Checkpoint every this many steps: what a resume after preemption "
      "starts from.", "training", minimum=1),
    F("SAVE_TOTAL_LIMIT", "int", "3", "Keep at most this many checkpoints (0: keep all).", "training",
      minimum=0),
    F("LOGGING_STEPS", "int", "10", "Log loss and learning rate every this many steps.", "training",
      minimum=1),
    F("LLAMAFACTORY_CONFIG", "str", "",
      "Optional LLaMA-Factory YAML for advanced options; its keys override the variables above "
      "(paths, dataset and output keys stay owned by the entrypoint).", "training"),
    # LoRA.
    F("LORA_RANK", "int", "8", "LoRA rank.", "lora", minimum=1, maximum=1024, fingerprint=True),
    F("LORA_ALPHA", "int", "16", "LoRA alpha (scale = alpha / rank).", "lora", minimum=1, maximum=65536,
      fingerprint=True),
    F("LORA_DROPOUT", "float", "0.0", "LoRA dropout.", "lora", minimum=0, maximum=0.9, fingerprint=True),
    F("LORA_TARGET", "list", "all", "Modules LoRA adapts: all, or names such as q_proj,v_proj.", "lora",
      fingerprint=True),
    F("USE_RSLORA", "bool", "false", "Rank-stabilised LoRA (scale = alpha / sqrt(rank)).", "lora",
      fingerprint=True),
    # Tracking.
    F("TRACKING", "choice", "mlflow", "mlflow, or none to train without tracking (a warning says so).",
      "tracking", choices=TRACKING_MODES),
    F("MLFLOW_TRACKING_URI", "str", "", "MLflow server (from the mlflow-config Secret).", "tracking",
      configmap=False, secret=True),
    F("MLFLOW_EXPERIMENT_NAME", "str", "llama-factory", "MLflow experiment for runs.", "tracking"),
    F("MLFLOW_TIMEOUT_SECONDS", "float", "10", "How long the start-up check waits for MLflow.",
      "tracking", minimum=0.1, maximum=600),
    # Behaviour on storage.
    F("REPLACE_OUTPUT", "bool", "false",
      "Move an existing output made with another config (or not made by this tool) aside, to "
      "<path>.replaced-<time>, and train anew. Nothing is deleted.", "runtime"),
    F("CHECKPOINT_ON_SIGTERM", "choice", "auto",
      "Save a checkpoint when SIGTERM arrives; auto: for LoRA/QLoRA only (full checkpoints rarely fit "
      "in a spot VM's 15 s notice).", "runtime", choices=CHECKPOINT_ON_SIGTERM),
    F("LOCK_TTL_SECONDS", "int", "120", "The output lock expires this long after its holder's last "
      "heartbeat; then another run may take it over.", "runtime", minimum=10, maximum=86400),
    F("LOCK_WAIT_SECONDS", "int", "300", "How long a run waits for a lock held by another run before "
      "exiting with the retriable code.", "runtime", minimum=0, maximum=86400),
    F("LOG_LEVEL", "choice", "INFO", "Log level.", "runtime", choices=LOG_LEVELS),
    F("TERMINATION_LOG_PATH", "str", "/dev/termination-log", "Where the one-line exit reason is written.",
      "runtime"),
    # Distributed training: torchrun across the pods of components/multinode (or a Kubeflow TrainJob).
    F("NPROC_PER_NODE", "str", "auto", "Training processes per pod: auto (one per visible GPU) or a "
      "number.", "distributed"),
    F("NNODES", "int", "", "Pods (nodes) that train together; components/multinode runs the Job with this many "
      "pods. Empty: Kubeflow Trainer's PET_NNODES, else 1.", "distributed", minimum=1, maximum=1024,
      kubeflow="PET_NNODES"),
    F("NODE_RANK", "int", "", "This pod's node rank (0: the one that locks, tracks and marks the output). "
      "Empty: PET_NODE_RANK, else JOB_COMPLETION_INDEX, else 0.", "distributed", minimum=0, maximum=1023,
      configmap=False, kubeflow="PET_NODE_RANK"),
    F("MASTER_ADDR", "str", "", "Address of node rank 0, where torchrun meets (required when NNODES > 1). "
      "Empty: PET_MASTER_ADDR, else <JOB_NAME>-0.<MULTINODE_SERVICE>, the stable DNS name of the Indexed "
      "Job's first pod.", "distributed", kubeflow="PET_MASTER_ADDR"),
    F("MASTER_PORT", "int", "29500", "Port of torchrun's rendezvous on node rank 0 (when NNODES > 1). "
      "Kubeflow Trainer's PET_MASTER_PORT applies when this is empty.", "distributed", minimum=1024,
      maximum=65535, kubeflow="PET_MASTER_PORT"),
    F("DDP_TIMEOUT", "int", "1800", "Seconds a rank waits for the others (pods starting late, rank 0 "
      "tokenizing the dataset, a collective) before the attempt fails; also how long a node that vanished "
      "without closing its connections stalls the rest.", "distributed", minimum=10, maximum=604800),
    F("DEEPSPEED", "choice", "none", "DeepSpeed ZeRO for multi-GPU training: zero2 shards optimizer state "
      "and gradients, zero3 also the weights (for models whose weights do not fit one GPU). Needs the "
      "deepspeed package; always runs under torchrun.", "distributed", choices=DEEPSPEED_STAGES),
    F("MULTINODE_SERVICE", "str", "", "Headless Service giving the training pods stable DNS names "
      "(components/multinode); names node 0 for MASTER_ADDR.", "distributed", configmap=False),
    F("JOB_COMPLETION_INDEX", "int", "", "Index of this pod in an Indexed Job (set by Kubernetes); "
      "NODE_RANK defaults to it.", "distributed", minimum=0, maximum=1023, configmap=False),
    # Merge and publish.
    F("MERGE_KEEP_VERSIONS", "int", "2", "Published merged-model versions kept (the current one included).",
      "merge", minimum=1, maximum=100),
    F("ADAPTER_WAIT_SECONDS", "int", "0", "How long the merge waits for training's completion marker "
      "(0: fail at once when the adapter is not complete).", "merge", minimum=0, maximum=604800),
    F("REGISTERED_MODEL_NAME", "str", "", "Register each published merge under this MLflow model name "
      "(empty: no registration).", "merge"),
    # WebUI (LLaMA Board).
    F("WEBUI_PORT", "int", "7860", "Port LLaMA Board listens on inside the pod.", "webui", minimum=1024,
      maximum=65535),
    F("WEBUI_WORKDIR", "path", "/storage/webui", "Working directory of the WebUI on NFS: its saves/, "
      "cache and config land there.", "webui"),
    # Identity of the pod (downward API and image): MLflow tags, and node 0's name in a multi-node Job.
    F("JOB_NAME", "str", "", "Kubernetes Job name (downward API); with MULTINODE_SERVICE it names node 0.", "job",
      configmap=False),
    F("POD_NAME", "str", "", "Pod name (downward API).", "job", configmap=False),
    F("IMAGE", "str", "", "Image reference the pod runs.", "job", configmap=False),
    # For the external vLLM (read by it, kept here so the ConfigMap documents one place).
    F("SERVED_MODEL_NAME", "str", "merged-model", "Model name the external vLLM serves.", "vllm"),
    F("MAX_MODEL_LEN", "int", "4096", "vLLM --max-model-len.", "vllm", minimum=1),
    F("TENSOR_PARALLEL_SIZE", "int", "1", "vLLM --tensor-parallel-size.", "vllm", minimum=1, maximum=64),
)
# Every variable the entrypoint reads, Kubeflow Trainer's names included, to the field it sets.
FIELDS_BY_ENV = {**{f.kubeflow: f for f in FIELDS if f.kubeflow}, **{f.env: f for f in FIELDS}}


def _parse(field: Field, raw: str) -> Any:
    value = raw.strip()
    if field.kind == "bool":
        low = value.lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
        raise ValueError
    if field.kind == "choice":
        for choice in field.choices:
            if value.lower() == choice.lower():
                return choice
        raise ValueError
    if field.kind in ("int", "float"):
        number: float
        if field.kind == "int":
            number = int(value, 10)
        else:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
        if field.minimum is not None and (
            number < field.minimum or (field.exclusive_minimum and number == field.minimum)
        ):
            raise ValueError
        if field.maximum is not None and number > field.maximum:
            raise ValueError
        return number
    if field.kind == "path":
        if not value.startswith("/") or "\x00" in value:
            raise ValueError
        return os.path.normpath(value)
    if field.kind == "list":
        items = tuple(item.strip() for item in value.split(",") if item.strip())
        if not items or any(not _NAME_RE.match(item) for item in items):
            raise ValueError
        return items
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated configuration. Attribute names are the variables' names in lower case."""

    values: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def public(self) -> dict[str, Any]:
        """Everything but secrets: safe for logs and MLflow params."""
        return {f.env: self.values[f.attr] for f in FIELDS if not f.secret}

    def fingerprint_fields(self) -> dict[str, Any]:
        return {f.env: self.values[f.attr] for f in FIELDS if f.fingerprint}


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
            values[field.attr] = _parse(field, raw)
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
    return Settings(values)


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


_CROSS_CHECKS: tuple[Callable[[dict[str, Any]], str | None], ...] = (
    _check_nproc,
    _check_tracking,
    _check_paths_distinct,
)


def default_configmap() -> dict[str, str]:
    """The ConfigMap data this table implies (what base/ must carry)."""
    return {f.env: f.default for f in FIELDS if f.configmap}


def configmap_env_text() -> str:
    """base/llm-config.env as entrypoint/settings.py's FIELDS defines it: defaults, each with its comment."""
    lines = [
        "# The unified configuration (ConfigMap llm-config): every variable the entrypoint reads, with",
        "# its default. GENERATED from entrypoint/settings.py (FIELDS); do not edit by hand. After changing",
        "# FIELDS run `invoke generate` and review the diff.",
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
