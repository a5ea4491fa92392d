"""`python -m entrypoint train`: decide, lock, train (in process or under torchrun), mark complete."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from entrypoint import datasets
from entrypoint.decisions import Action, Decision, decide_train, observe_output
from entrypoint.errors import ConfigError, EntrypointError, ExitCode, Interrupted, finish
from entrypoint.plan import TrainPlan, build_plan
from entrypoint.settings import Settings
from entrypoint.storage import (
    RUN_FILE,
    OutputLock,
    atomic_write_json,
    lock_path_for,
    move_aside,
    state_dir,
    write_marker,
)
from entrypoint.tracking import preflight, redact_uri

log = logging.getLogger("entrypoint")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ARTIFACTS = ("training_loss.png", "trainer_log.jsonl", "all_results.json", "train_results.json",
             "adapter_config.json")


def decide(plan: TrainPlan) -> Decision:
    state = observe_output(plan.output)
    return decide_train(plan.fingerprint, plan.fingerprint_inputs, state, plan.settings.replace_output)


def checkpoint_on_stop(settings: Settings) -> bool:
    if settings.checkpoint_on_sigterm == "auto":
        return settings.finetuning_type in ("lora", "qlora")
    return settings.checkpoint_on_sigterm == "true"


def procs_per_node(settings: Settings) -> int:
    if settings.nproc_per_node != "auto":
        return int(settings.nproc_per_node)
    import torch

    return max(1, torch.cuda.device_count())


def check_outputs(plan: TrainPlan) -> dict[str, int]:
    """The files a finished run must have left; their sizes go into the marker."""
    out = plan.output
    if plan.lf_args.get("finetuning_type") == "lora":
        missing = [name for name in ADAPTER_FILES if not (out / name).is_file()]
    else:
        missing = [] if (out / "config.json").is_file() and any(out.glob("*.safetensors")) else [
            "config.json and *.safetensors"]
    if missing:
        raise EntrypointError(f"training ended but {out} lacks {', '.join(missing)}; not marking it complete")
    return {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}


def run(settings: Settings) -> int:
    t0 = time.monotonic()
    plan = build_plan(settings)
    decision = decide(plan)
    if decision.action is Action.SKIP:
        return finish(ExitCode.OK, f"skipped: {plan.output} is {decision.reason} "
                      f"(fingerprint {plan.fingerprint[:12]})")
    if decision.action is Action.REFUSE:
        raise ConfigError(f"LORA_OUTPUT_PATH={str(plan.output)!r}: {decision.reason}")

    datasets.validate(plan.data, Path(settings.dataset_path))
    from entrypoint import worker  # the heavy imports start here, once there is work to do

    worker.check_args(plan.lf_args)
    tracking = settings.tracking == "mlflow"
    if tracking:
        preflight(settings.mlflow_tracking_uri, settings.mlflow_experiment_name, settings.mlflow_timeout_seconds)
    else:
        log.warning("TRACKING=none: this run is not recorded in MLflow")

    lock = OutputLock(lock_path_for(plan.output), ttl=settings.lock_ttl_seconds)
    with lock.held(settings.lock_wait_seconds):
        decision = decide(plan)  # another run may have finished or started while we waited
        if decision.action is Action.SKIP:
            return finish(ExitCode.OK, f"skipped: {plan.output} is {decision.reason}")
        if decision.action is Action.REFUSE:
            raise ConfigError(f"LORA_OUTPUT_PATH={str(plan.output)!r}: {decision.reason}")
        log.info("%s (fingerprint %s)", decision.reason, plan.fingerprint[:12])
        return _train_locked(plan, decision, lock, tracking, t0)


def _train_locked(plan: TrainPlan, decision: Decision, lock: OutputLock, tracking: bool, t0: float) -> int:
    from entrypoint import worker

    settings = plan.settings
    if decision.replace_first:
        moved = move_aside(plan.output)
        log.warning("moved the previous output to %s", moved)
    previous = observe_output(plan.output).run or {}
    run_info: dict[str, Any] = {
        "fingerprint": plan.fingerprint,
        "inputs": plan.fingerprint_inputs,
        "started_at": time.time(),
        "attempt": int(previous.get("attempt", 0)) + 1 if decision.action is Action.RESUME else 1,
        "mlflow_run_id": previous.get("mlflow_run_id") if previous.get("fingerprint") == plan.fingerprint else None,
    }
    plan.output.mkdir(parents=True, exist_ok=True)
    datasets.write_generated_info(plan.data)

    tracker = None
    if tracking:
        from entrypoint.tracking import Tracker

        tracker = Tracker(settings.mlflow_tracking_uri, settings.mlflow_timeout_seconds)
        tags = {
            "output_path": str(plan.output),
            "fingerprint": plan.fingerprint,
            "finetuning_type": settings.finetuning_type,
            "job_name": settings.job_name,
            "pod_name": settings.pod_name,
            "image": settings.image,
        }
        run_info["mlflow_run_id"] = tracker.open_run(
            settings.mlflow_experiment_name, run_info["mlflow_run_id"],
            run_name=settings.job_name or plan.output.name, tags={k: v for k, v in tags.items() if v},
        )
        tracker.log_params({**settings.public(), **{f"lf.{k}": v for k, v in plan.lf_args.items()}})
        tracker.set_tags({"attempt": str(run_info["attempt"]), "decision": decision.action.value})
    atomic_write_json(state_dir(plan.output) / RUN_FILE, run_info)

    args = dict(plan.lf_args)
    if decision.action is Action.RESUME:
        args["resume_from_checkpoint"] = str(plan.output / f"checkpoint-{decision.checkpoint}")
    if decision.fresh_dir:
        args["overwrite_output_dir"] = True  # only ever our own unfinished output of the same config

    status = "FAILED"
    try:
        nproc = procs_per_node(settings)
        if nproc > 1:
            _train_torchrun(plan, args, run_info, nproc, tracking)
        else:
            stop = worker.StopFlag()
            stop.install()
            worker.train(args, checkpoint_on_stop(settings), stop, tracker, lock.lost)
        files = check_outputs(plan)
        results = _read_json(plan.output / "all_results.json")
        write_marker(plan.output, {
            "fingerprint": plan.fingerprint,
            "inputs": plan.fingerprint_inputs,
            "finished_at": time.time(),
            "finetuning_type": settings.finetuning_type,
            "mlflow_run_id": run_info["mlflow_run_id"],
            "files": files,
            "results": results,
        })
        status = "FINISHED"
    except Interrupted:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            if status == "FINISHED":
                for name in ARTIFACTS:
                    tracker.log_artifact(plan.output / name)
                tracker.log_metrics({"wall_seconds": time.monotonic() - t0}, step=0)
            tracker.close(status, timeout=60)
    where = f"; MLflow run {run_info['mlflow_run_id']} at {redact_uri(settings.mlflow_tracking_uri)}" \
        if tracking else ""
    return finish(ExitCode.OK, f"trained: {plan.output} is complete{where}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _train_torchrun(plan: TrainPlan, args: dict[str, Any], run_info: dict[str, Any], nproc: int,
                    tracking: bool) -> None:
    """Several processes per pod: re-execute under torchrun; rank 0 reports back through a file."""
    settings = plan.settings
    spec_path = state_dir(plan.output) / "worker.json"
    result_path = state_dir(plan.output) / "worker-result.json"
    result_path.unlink(missing_ok=True)
    atomic_write_json(spec_path, {
        "lf_args": args,
        "checkpoint_on_stop": checkpoint_on_stop(settings),
        "mlflow_run_id": run_info["mlflow_run_id"] if tracking else None,
        "experiment": settings.mlflow_experiment_name,
        "mlflow_timeout": settings.mlflow_timeout_seconds,
        "result_path": str(result_path),
    })
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--nnodes=1", "--master-addr=127.0.0.1", "--master-port=0",
               "-m", "entrypoint", "_worker", str(spec_path)]
    log.info("launching %d processes: %s", nproc, " ".join(command))
    child = subprocess.Popen(command, start_new_session=True)
    got_sigterm = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal got_sigterm
        got_sigterm = True
        os.killpg(child.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = _read_json(result_path)
    if code == 0 and result.get("code") == 0:
        return
    message = result.get("message") or f"torchrun exited with {code}"
    if got_sigterm or result.get("code") == ExitCode.INTERRUPTED:
        raise Interrupted(message)
    if result.get("code") == ExitCode.CONFIG:
        raise ConfigError(message)
    raise EntrypointError(message)
