"""`python -m entrypoint train`: decide, lock, train (in process or under torchrun), mark complete.

With several nodes (NNODES > 1) every pod runs this launcher. All of them make the same decision from the
shared storage (skip, refuse, or train), and all of them exit the same way. Node 0 alone takes the lock and
writes: it moves an old output aside, records run.json, opens the MLflow run and, once every rank has
finished, writes the completion marker. The other nodes write nothing to the storage; their training
processes join node 0's torchrun and take their arguments from global rank 0 (worker.follow_rank_zero).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from entrypoint import datasets
from entrypoint.decisions import Action, Decision, checkpoint_layout_problem, decide_train, observe_output
from entrypoint.errors import ConfigError, EntrypointError, ExitCode, Interrupted, TemporaryFailure, finish
from entrypoint.plan import TrainPlan, build_plan
from entrypoint.settings import Settings, check_topology
from entrypoint.storage import (
    RUN_FILE,
    OutputLock,
    atomic_write_json,
    lock_path_for,
    move_aside,
    read_marker,
    state_dir,
    write_marker,
)
from entrypoint.tracking import preflight, redact_uri

log = logging.getLogger("entrypoint")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ARTIFACTS = ("training_loss.png", "trainer_log.jsonl", "all_results.json", "train_results.json",
             "adapter_config.json")
# How long a node other than node 0 waits, after its training processes ended well, for node 0 to mark the
# output complete: node 0 checks the files and writes the marker in seconds, and NFS may hide a new file
# from another client for up to a minute (cached directory lookups).
MARKER_WAIT_SECONDS = 300.0


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
    check_topology(settings)
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
        # Every node checks: with MLflow down all of them exit 75 at once, instead of the others waiting for
        # a node 0 that never comes to the rendezvous.
        preflight(settings.mlflow_tracking_uri, settings.mlflow_experiment_name, settings.mlflow_timeout_seconds)
    else:
        log.warning("TRACKING=none: this run is not recorded in MLflow")
    if settings.node_rank > 0:
        return _train_follower(plan, decision)

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
    nproc = procs_per_node(settings)
    deepspeed = plan.lf_args.get("deepspeed")
    layout = {"world_size": settings.nnodes * nproc, "deepspeed": Path(deepspeed).name if deepspeed else None}
    if decision.replace_first:
        moved = move_aside(plan.output)
        log.warning("moved the previous output to %s", moved)
    previous = observe_output(plan.output).run or {}
    problem = checkpoint_layout_problem(previous.get("layout"), layout) if decision.action is Action.RESUME else None
    if problem:
        raise ConfigError(f"LORA_OUTPUT_PATH={str(plan.output)!r}: {problem}")
    run_info: dict[str, Any] = {
        "fingerprint": plan.fingerprint,
        "inputs": plan.fingerprint_inputs,
        "started_at": time.time(),
        "attempt": int(previous.get("attempt", 0)) + 1 if decision.action is Action.RESUME else 1,
        "mlflow_run_id": previous.get("mlflow_run_id") if previous.get("fingerprint") == plan.fingerprint else None,
        "layout": layout,  # what its checkpoints can be resumed with
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

    args = launch_args(plan, decision)
    status = "FAILED"
    try:
        if uses_torchrun(plan, nproc):
            _train_torchrun(plan, args, nproc, run_info["mlflow_run_id"] if tracking else None)
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


def launch_args(plan: TrainPlan, decision: Decision) -> dict[str, Any]:
    """LLaMA-Factory's arguments for this decision: where to resume from, whether to start afresh."""
    args = dict(plan.lf_args)
    if decision.action is Action.RESUME:
        args["resume_from_checkpoint"] = str(plan.output / f"checkpoint-{decision.checkpoint}")
    if decision.fresh_dir:
        args["overwrite_output_dir"] = True  # only ever our own unfinished output of the same config
    return args


def uses_torchrun(plan: TrainPlan, nproc: int) -> bool:
    """Several processes, on this pod or across pods, or DeepSpeed (which LLaMA-Factory runs only in a
    distributed process): torchrun. One process on one node trains in this very process."""
    return plan.settings.nnodes > 1 or nproc > 1 or bool(plan.lf_args.get("deepspeed"))


def _train_follower(plan: TrainPlan, decision: Decision) -> int:
    """A node other than node 0: no lock, nothing written to the storage. Its processes join node 0's
    rendezvous and train with global rank 0's arguments; it succeeds once node 0 has marked the output
    complete, so the Job succeeds only when the output is complete."""
    settings = plan.settings
    node = f"node {settings.node_rank} of {settings.nnodes}"
    log.info("%s: %s (fingerprint %s); joining node 0 at %s:%d", node, decision.reason, plan.fingerprint[:12],
             settings.master_addr, settings.master_port)
    result = _train_torchrun(plan, launch_args(plan, decision), procs_per_node(settings), None)
    deadline = time.monotonic() + MARKER_WAIT_SECONDS
    while (read_marker(plan.output) or {}).get("fingerprint") != plan.fingerprint:
        if time.monotonic() >= deadline:
            raise TemporaryFailure(
                f"{node}: training ended, but node 0 did not mark {plan.output} complete within "
                f"{MARKER_WAIT_SECONDS:.0f}s; the Job retries and resumes from the last checkpoint"
            )
        time.sleep(1.0)
    return finish(ExitCode.OK, f"{node}: trained as rank {result.get('rank')} of {result.get('world_size')} "
                  f"to step {result.get('global_step')}; {plan.output} is complete (marked by node 0)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _train_torchrun(plan: TrainPlan, args: dict[str, Any], nproc: int, mlflow_run_id: str | None) -> dict[str, Any]:
    """Re-execute under torchrun; this node's local rank 0 reports back through a file.

    The spec and result files live in a temporary directory of this pod, not on the shared storage: each
    node has its own, and the nodes other than node 0 write nothing shared. With NNODES > 1 torchrun meets
    the other nodes at MASTER_ADDR:MASTER_PORT; max-restarts=0 makes a failed rank end the attempt on every
    node (the others' collectives fail with it), and the Job retries all of them.
    """
    settings = plan.settings
    if settings.nnodes > 1:
        where = [f"--nnodes={settings.nnodes}", f"--node-rank={settings.node_rank}",
                 f"--master-addr={settings.master_addr}", f"--master-port={settings.master_port}",
                 # How long this node waits at the rendezvous for the others (pods scheduled late).
                 f"--rdzv-conf=timeout={settings.ddp_timeout}"]
    else:
        # One pod: a local rendezvous on a free port. (A static one on port 0 would hand the processes
        # port 0, not the port it bound.)
        where = ["--standalone"]
    with tempfile.TemporaryDirectory(prefix="entrypoint-worker-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        atomic_write_json(spec_path, {
            "lf_args": args,
            "checkpoint_on_stop": checkpoint_on_stop(settings),
            "mlflow_run_id": mlflow_run_id,
            "experiment": settings.mlflow_experiment_name,
            "mlflow_timeout": settings.mlflow_timeout_seconds,
            "result_path": str(result_path),
        })
        command = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
                   "--max-restarts=0", "-m", "entrypoint", "_worker", str(spec_path)]
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
        return result
    message = result.get("message") or (
        f"torchrun exited with {code} before this node's first process reported: a training process was killed "
        "(out of memory?) or lost its peers on another node; see the log above")
    if got_sigterm or result.get("code") == ExitCode.INTERRUPTED:
        raise Interrupted(message)
    if result.get("code") == ExitCode.CONFIG:
        raise ConfigError(message)
    raise EntrypointError(message)
