"""`python -m entrypoint demo`: the product itself, run locally on a generated tiny model.

A folder laid out like /storage gets a tiny model and the demo dataset (once); then the very commands
the Jobs run, `python -m entrypoint train` and `merge`, train it (logging to a local MLflow store) and
publish the merged model, which is loaded and asked the demo prompt. Running the demo again is cheap:
finished training and merging are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from entrypoint.storage import read_marker

DEMO_ENV = {
    "TEMPLATE": "llama3",
    "CUTOFF_LEN": "128",
    "BATCH_SIZE": "8",
    "GRADIENT_ACCUMULATION": "1",
    "LEARNING_RATE": "1e-2",
    "LORA_RANK": "16",
    "LORA_ALPHA": "32",
    "SAVE_STEPS": "20",
    "LOGGING_STEPS": "10",
    "PRECISION": "fp32",
    "MLFLOW_EXPERIMENT_NAME": "demo",
}
DEMO_STEPS = 60


def storage_env(root: Path, steps: int) -> dict[str, str]:
    return {
        **DEMO_ENV,
        "BASE_MODEL_PATH": str(root / "models" / "base-model"),
        "LORA_OUTPUT_PATH": str(root / "output" / "lora-adapter"),
        "MERGED_MODEL_PATH": str(root / "models" / "merged-model"),
        "DATASET_PATH": str(root / "data"),
        "WEBUI_WORKDIR": str(root / "webui"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
        "TRACKING": "mlflow",
        "TERMINATION_LOG_PATH": str(root / "termination-log"),
        "MAX_STEPS": str(steps),
    }


def prepare(root: Path) -> None:
    from entrypoint.tinymodel import make_tiny_model, write_demo_data

    base = root / "models" / "base-model"
    if not (base / "config.json").is_file():
        print(f"generating a tiny model in {base}", flush=True)
        make_tiny_model(base)
    if not (root / "data" / "dataset_info.json").is_file():
        write_demo_data(root / "data")
    (root / "mlflow").mkdir(parents=True, exist_ok=True)


def run(storage: str, steps: int | None = None) -> int:
    root = Path(storage).resolve()
    prepare(root)
    env = {**os.environ, **storage_env(root, steps or DEMO_STEPS)}
    for command in ("train", "merge"):
        code = subprocess.run([sys.executable, "-m", "entrypoint", command], env=env).returncode
        if code:
            return code
    from entrypoint.tinymodel import DEMO_ANSWER, DEMO_PROMPT, generate_answer

    merged = Path(env["MERGED_MODEL_PATH"])
    answer = generate_answer(merged, DEMO_PROMPT)
    adapter = Path(env["LORA_OUTPUT_PATH"])
    marker = read_marker(adapter) or {}
    results = marker.get("results", {})
    print("\n== demo: trained, merged, published ==")
    print(f"adapter:      {adapter}")
    print(f"merged model: {merged} -> {merged.resolve().name} (what vLLM would read)")
    print(f"prompt:       {DEMO_PROMPT}")
    print(f"answer:       {answer}")
    print(f"expected:     {DEMO_ANSWER}  [{'match' if answer == DEMO_ANSWER else 'MISMATCH'}]")
    print(f"train loss:   {results.get('train_loss')}")
    print(f"MLflow run:   {marker.get('mlflow_run_id')} (experiment {env['MLFLOW_EXPERIMENT_NAME']!r})")
    print(f"MLflow store: {env['MLFLOW_TRACKING_URI']}")
    print(f"  browse it:  mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}")
    print("marker:       " + json.dumps({k: marker.get(k) for k in ("fingerprint", "finetuning_type")}))
    return 0 if answer == DEMO_ANSWER else 1
