"""What a finished training output holds, and the figures its completion marker carries.

- check_outputs: the files a finished run must have left (a LoRA adapter, or a full model).
- run_results: the run's figures from the whole trainer state, every attempt included. transformers' own
  train_loss covers only the steps of the last attempt (a run resumed one step before its end reports the
  loss of that one step, divided by every step), so the marker's train_loss is computed from the logged
  losses instead.
- final_checkpoint / finish_from_checkpoint: a run interrupted after its last checkpoint, which is its
  last step, is finished from that checkpoint without training again (resuming would train a step past
  MAX_STEPS and write a checkpoint-(N+1)).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from entrypoint.errors import EntrypointError
from entrypoint.files import fsync_dir, read_json
from entrypoint.model_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from entrypoint.storage import CHECKPOINT_RECORD

TRAINER_STATE = "trainer_state.json"
# What a checkpoint holds only to continue training; the rest is what a final save writes too.
RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state", "training_args.bin", CHECKPOINT_RECORD)


def check_outputs(output: Path, lora: bool) -> dict[str, int]:
    """The files a finished run must have left; their sizes go into the marker."""
    if lora:
        missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (output / name).is_file()]
    else:
        missing = [] if (output / "config.json").is_file() and any(output.glob("*.safetensors")) else [
            "config.json and *.safetensors"]
    if missing:
        raise EntrypointError(f"training ended but {output} lacks {', '.join(missing)}; not marking it complete")
    return {p.name: p.stat().st_size for p in sorted(output.iterdir()) if p.is_file()}


def run_results(output: Path) -> dict[str, Any]:
    """LLaMA-Factory's all_results.json, with train_loss and global_step over the whole run."""
    results = read_json(output / "all_results.json") or {}
    state = read_json(output / TRAINER_STATE) or {}
    history = [entry for entry in state.get("log_history") or () if isinstance(entry, dict)]
    losses = [(int(entry["step"]), float(entry["loss"])) for entry in history
              if isinstance(entry.get("loss"), (int, float)) and isinstance(entry.get("step"), int)]
    if losses:
        previous, total = 0, 0.0
        for step, loss in losses:  # each logged loss is the mean over the steps since the previous log
            total += loss * (step - previous)
            previous = step
        results["train_loss"] = total / previous
    if isinstance(state.get("global_step"), int):
        results["global_step"] = state["global_step"]
    return results


def final_checkpoint(checkpoint: Path) -> bool:
    """Whether a complete checkpoint is at the run's last step (its trainer state says global_step >=
    max_steps, which transformers computes for epoch-based runs too)."""
    state = read_json(checkpoint / TRAINER_STATE) or {}
    step, last = state.get("global_step"), state.get("max_steps")
    return isinstance(step, int) and isinstance(last, int) and last > 0 and step >= last


def finish_from_checkpoint(checkpoint: Path, output: Path) -> None:
    """Write the final output from the last step's checkpoint, as the final save would have: its model (or
    adapter), tokenizer and trainer state, without what only resuming needs. The checkpoint stays."""
    for path in sorted(checkpoint.iterdir()):
        if path.is_file() and not path.name.startswith(RESUME_ONLY):
            tmp = output / f".{path.name}.tmp"
            shutil.copyfile(path, tmp)
            tmp.replace(output / path.name)
    fsync_dir(output)
