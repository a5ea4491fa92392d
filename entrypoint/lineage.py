"""What each published version was made from: lineage.json (for machines) and README.md (the model card).

Both are written into the version directory before it is published, so a version and its account of itself
appear together. lineage.json holds: the base model (path and the identity of its files), the adapter's
configuration, the dataset (its identity and statistics: records, tokens, how many records CUTOFF_LEN cuts),
the training settings that shape the result, the MLflow run and experiment, the image, the gate's results and
the time. The same dataset identity and statistics go to the training's MLflow run as a dataset input
(MLflow's dataset API), so the run links data, adapter and published model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError
from entrypoint.files import atomic_write_json, read_json
from entrypoint.fingerprint import digest

log = logging.getLogger("entrypoint")

LINEAGE = "lineage.json"
CARD = "README.md"
BASE_CARD = "README.base.md"  # the base model's own README, kept beside ours


def dataset_statistics(settings: Any) -> dict[str, Any]:
    """Records and tokens of the training data as LLaMA-Factory renders them (token_lengths), or why not."""
    from entrypoint.plan import build_plan

    try:
        return plan_statistics(build_plan(settings))
    except ConfigError as exc:
        return {"error": str(exc)}


def plan_statistics(plan: Any) -> dict[str, Any]:
    from entrypoint import token_lengths

    report = token_lengths.measure(plan)
    measured = report["measured"] or 1
    return {**report, "share_truncated": round(report["longer_than_cutoff"] / measured, 4)}


def build_lineage(settings: Any, inputs: Any, version_name: str, result: Any, gate: dict[str, Any] | None,
                  statistics: dict[str, Any]) -> dict[str, Any]:
    marker = inputs.marker
    trained = marker.get("inputs") or {}
    data = trained.get("data") or {}
    adapter_config = None if inputs.full else read_json(inputs.adapter / "adapter_config.json")
    return {
        "version": version_name,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "served_path": settings.merged_model_path,
        "served_model_name": settings.served_model_name,
        "base_model": {"path": str(inputs.base), "identity": inputs.identity.get("base") or None,
                       "model_type": (read_json(inputs.base / "config.json") or {}).get("model_type")},
        "adapter": {"path": str(inputs.adapter), "finetuning_type": marker.get("finetuning_type"),
                    "identity": digest(inputs.identity.get("adapter") or {}),
                    "config": {k: adapter_config.get(k) for k in (
                        "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
                        "modules_to_save") if k in adapter_config} if adapter_config else None},
        "dataset": {"identity": digest(data) if data else None, "names": sorted(data.get("entries") or {}),
                    "files": data.get("files"), "statistics": statistics},
        "training": {"fingerprint": marker.get("fingerprint"), "settings": trained.get("args"),
                     "template": marker.get("template"), "results": marker.get("results")},
        "mlflow": {"run_id": inputs.mlflow_run_id, "experiment": settings.mlflow_experiment_name,
                   "tracking_uri": settings.mlflow_tracking_uri if settings.tracking == "mlflow" else None},
        "image": settings.image or None,
        "merge": {"fingerprint": inputs.fingerprint, "dtype": result.dtype, "bytes": result.output_bytes,
                  "tensors_merged": result.tensors_merged},
        "gate": gate,
    }


def write_lineage(workdir: Path, lineage: dict[str, Any]) -> None:
    """lineage.json and the model card; the base's README, copied by the merge, is kept as README.base.md."""
    card = workdir / CARD
    if card.is_file():
        card.rename(workdir / BASE_CARD)
    atomic_write_json(workdir / LINEAGE, lineage)
    card.write_text(model_card(lineage), encoding="utf-8")


def model_card(lineage: dict[str, Any]) -> str:
    base, adapter, data = lineage["base_model"], lineage["adapter"], lineage["dataset"]
    stats = data.get("statistics") or {}
    training = lineage["training"]
    settings = training.get("settings") or {}
    gate = lineage.get("gate") or {}
    config = adapter.get("config") or {}
    results = training.get("results") or {}
    lines = [
        f"# {lineage['served_model_name']} {lineage['version']}",
        "",
        f"Published {lineage['published_at']} at `{lineage['served_path']}` (what vLLM serves). "
        "Machine-readable details: `lineage.json`; the publish gate's report: `gate.json`.",
        "",
        "## Made from",
        "",
        f"- Base model: `{base['path']}` ({base.get('model_type')})",
        f"- Adapter: `{adapter['path']}` ({adapter.get('finetuning_type')}"
        + (f", rank {config.get('r')}, alpha {config.get('lora_alpha')}, targets {config.get('target_modules')}"
           if config else "") + ")",
        f"- Dataset: {', '.join(data.get('names') or ['?'])} (identity `{str(data.get('identity'))[:12]}`): "
        + (f"{stats.get('records')} records, {stats.get('tokens')} tokens measured, "
           f"{stats.get('longer_than_cutoff')} longer than CUTOFF_LEN={stats.get('cutoff_len')} "
           f"({100 * stats.get('share_truncated', 0):.1f}%)" if "records" in stats
           else f"statistics unavailable ({stats.get('error', 'not measured')})"),
        f"- Chat template: {(training.get('template') or {}).get('name')}, stops at "
        f"{(training.get('template') or {}).get('stop_words')}",
        f"- Training: learning rate {settings.get('learning_rate')}, epochs {settings.get('num_train_epochs')}, "
        f"max steps {settings.get('max_steps')}, cutoff {settings.get('cutoff_len')}; final loss "
        f"{results.get('train_loss')}, steps {results.get('global_step')}",
        f"- MLflow: run `{lineage['mlflow'].get('run_id')}` in experiment `{lineage['mlflow'].get('experiment')}`",
        f"- Image: `{lineage.get('image')}`",
        "",
        "## Publish gate",
        "",
    ]
    if not gate:
        lines.append("Not run (PUBLISH_GATE=off).")
    else:
        lines.append(f"Mode {gate.get('mode')}: {'passed' if gate.get('passed') else 'FAILED'}.")
        lines += [f"- {c['name']}: {c['status']} ({c['detail']})" for c in gate.get("checks", ())]
    lines += ["", "## Serve", "", f"`vllm serve {lineage['served_path']} --served-model-name "
              f"{lineage['served_model_name']}` (restart vLLM to serve a new version).", ""]
    return "\n".join(lines)


def summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gate report as lineage keeps it: each check's outcome and detail, without probe outputs."""
    if report is None:
        return None
    return {"mode": report["mode"], "passed": report["passed"], "seconds": report["seconds"],
            "checks": [{"name": c["name"], "status": c["status"], "detail": c["detail"]} for c in report["checks"]]}


def log_dataset_input(tracker: Any, lineage: dict[str, Any]) -> None:
    """The dataset as an MLflow dataset input of the training run, with the lineage's identity and statistics."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    data = lineage["dataset"]
    dataset = Dataset(name=",".join(data["names"]) or "training-data", digest=str(data["identity"])[:36],
                      source_type="local", source=json.dumps({"files": sorted(data.get("files") or {})}),
                      profile=json.dumps(data.get("statistics") or {}))
    tracker.client.log_inputs(tracker.run_id, datasets=[
        DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])
