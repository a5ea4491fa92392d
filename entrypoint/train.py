"""`python -m entrypoint train`: plan, decide, lock, record the run, train, mark complete.

Each step is one function below, in the order `run` calls them:
- plan: every check that can fail before a byte is written (plan.build_plan, datasets, LLaMA-Factory's own
  argument parser, the MLflow preflight);
- decide: skip, refuse, start or resume, from what the output holds (decisions.py);
- lock: one writer per output (storage.OutputLock), deciding again once it is held;
- open the run record: move an old output aside when asked, run.json (the first write), the generated
  dataset_info, the MLflow run;
- train: in this process or under torchrun (worker.py);
- record: the completion marker (written last), artifacts, the MLflow run's final status.

With several nodes (NNODES > 1) every pod runs this launcher. All of them make the same decision from the
shared storage, and all of them exit the same way. Node 0 alone takes the lock and writes; the other nodes'
training processes join node 0's torchrun and take their arguments from global rank 0
(worker.follow_rank_zero), and they exit 0 only once node 0 has marked the output complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoint import datasets
from entrypoint.decisions import Action, Decision, checkpoint_layout_problem, decide, observe_output
from entrypoint.errors import (
    TERMINAL_CODES,
    ConfigError,
    EntrypointError,
    ExitCode,
    Interrupted,
    TemporaryFailure,
    finish,
    write_termination_log,
)
from entrypoint.files import atomic_write_json
from entrypoint.model_dir import ADAPTER_CONFIG
from entrypoint.outputs import check_outputs, final_checkpoint, finish_from_checkpoint, run_results
from entrypoint.plan import TrainPlan, build_plan
from entrypoint.settings import Settings, check_topology
from entrypoint.storage import (
    RUN_FILE,
    OutputLock,
    clear_failure,
    lock_path_for,
    move_aside,
    owner_id,
    read_marker,
    record_failure,
    state_dir,
    write_marker,
)
from entrypoint.tracking import NullTracker, Tracker, preflight, redact_uri, repair_run

log = logging.getLogger("entrypoint")

ARTIFACTS = ("training_loss.png", "trainer_log.jsonl", "all_results.json", "train_results.json", ADAPTER_CONFIG)
# How long a node other than node 0 waits, after its training processes ended well, for node 0 to mark the
# output complete: node 0 checks the files and writes the marker in seconds, and NFS may hide a new file
# from another client for up to a minute (cached directory lookups).
MARKER_WAIT_SECONDS = 300.0
TRACKING_CLOSE_SECONDS = 60.0


@dataclass(frozen=True)
class RunRecord:
    """run.json: what this attempt trains, written before anything else of it."""

    data: dict[str, Any]

    @property
    def mlflow_run_id(self) -> str | None:
        return self.data.get("mlflow_run_id")


def run(settings: Settings) -> int:
    """Train; a failure no retry can fix is recorded beside the output (node 0), so a merge waiting for this
    output stops waiting (merge_inputs.wait_for_adapter); a run that gets past validation clears it."""
    try:
        return _run(settings)
    except EntrypointError as exc:
        if exc.exit_code in TERMINAL_CODES and settings.node_rank == 0:
            record_failure(Path(settings.lora_output_path), int(exc.exit_code), str(exc), settings.job_name)
        raise


def _run(settings: Settings) -> int:
    t0 = time.monotonic()
    check_topology(settings)
    plan = build_plan(settings)
    decision = decide(plan)
    if decision.action is Action.SKIP:
        complete_tracking(plan)
        return finish(ExitCode.OK, f"skipped: {plan.output} is {decision.reason} "
                      f"(fingerprint {plan.fingerprint[:12]})")
    refuse_if_asked(plan, decision)
    template = check_before_writing(plan)
    if settings.node_rank == 0:
        clear_failure(plan.output)
    if settings.node_rank > 0:
        return train_follower(plan, decision)

    lock = OutputLock(lock_path_for(plan.output), ttl=settings.lock_ttl_seconds, owner=owner_id(settings.pod_name))
    with lock.held(settings.lock_wait_seconds):
        decision = decide(plan, holding_lock=True)  # another run may have finished or started while we waited
        if decision.action is Action.SKIP:
            return finish(ExitCode.OK, f"skipped: {plan.output} is {decision.reason}")
        refuse_if_asked(plan, decision)
        log.info("%s (fingerprint %s)", decision.reason, plan.fingerprint[:12])
        return train_locked(plan, decision, lock, template, t0)


def complete_tracking(plan: TrainPlan) -> None:
    """A finished run whose MLflow record an outage left incomplete gets it now (node 0; MLflow is imported only
    then: the skip path stays light otherwise)."""
    settings, marker = plan.settings, read_marker(plan.output) or {}
    if marker.get("mlflow_synced", True) or not marker.get("mlflow_run_id") or settings.node_rank != 0 \
            or settings.tracking != "mlflow":
        return
    if repair_run(settings.mlflow_tracking_uri, settings.mlflow_timeout_seconds, marker["mlflow_run_id"],
                  plan.output, ARTIFACTS):
        mark_synced(plan.output)


def refuse_if_asked(plan: TrainPlan, decision: Decision) -> None:
    if decision.action is Action.REFUSE:
        raise ConfigError(f"LORA_OUTPUT_PATH={str(plan.output)!r}: {decision.reason}")


def check_before_writing(plan: TrainPlan) -> dict[str, Any]:
    """What the plan could not check without reading every record or importing LLaMA-Factory; returns what
    the chat template does to the tokenizer (worker.check_template)."""
    settings = plan.settings
    datasets.validate(plan.data, Path(settings.dataset_path))
    datasets.checked_eval(settings)  # the merge's publish gate reads it
    from entrypoint import worker  # the heavy imports start here, once there is work to do

    worker.check_model_type(plan.base.config, settings.trust_remote_code)
    template = worker.check_args(plan.lf_args)
    if settings.tracking == "mlflow":
        # Every node checks: with MLflow down all of them exit 75 at once, instead of the others waiting for
        # a node 0 that never comes to the rendezvous.
        preflight(settings.mlflow_tracking_uri, settings.mlflow_experiment_name, settings.mlflow_timeout_seconds)
    else:
        log.warning("TRACKING=none: this run is not recorded in MLflow")
    return template


def train_locked(plan: TrainPlan, decision: Decision, lock: OutputLock, template: dict[str, Any], t0: float) -> int:
    from entrypoint import worker

    settings = plan.settings
    nproc = worker.procs_per_node(settings)
    record = open_run_record(plan, decision, nproc)
    tracker = Tracker.for_settings(settings)
    with tracker.run(settings.mlflow_experiment_name, record.mlflow_run_id, settings.job_name or plan.output.name,
                     run_tags(plan), TRACKING_CLOSE_SECONDS) as mlflow_run_id:
        tracker.log_params({**settings.public(), **{f"lf.{k}": v for k, v in plan.lf_args.items()}})
        tracker.set_tags({"attempt": str(record.data["attempt"]), "decision": decision.action.value})
        record = write_run_record(plan, RunRecord({**record.data, "mlflow_run_id": mlflow_run_id}))
        checkpoint = plan.output / f"checkpoint-{decision.checkpoint}"
        try:
            if decision.action is Action.RESUME and final_checkpoint(checkpoint):
                log.info("checkpoint-%d is the run's last step: finishing from it without training",
                         decision.checkpoint)
                finish_from_checkpoint(checkpoint, plan.output)
            else:
                worker.run_training(plan, decision, nproc, tracker, lock)
        except Interrupted as exc:
            # The exit reason first: MLflow gets only what is left of the grace period after it.
            write_termination_log(f"exit {int(exc.exit_code)}: {exc}")
            raise
        lock.token_check.check()  # a run that lost its lock writes no marker
        mark_complete(plan, record, template, synced=record.mlflow_run_id is None)
        record_results(plan, tracker, t0)
    if tracker.synced or (record.mlflow_run_id and repair_run(
            settings.mlflow_tracking_uri, settings.mlflow_timeout_seconds, record.mlflow_run_id, plan.output,
            ARTIFACTS)):
        mark_synced(plan.output)
    where = f"; MLflow run {record.mlflow_run_id} at {redact_uri(settings.mlflow_tracking_uri)}" \
        if record.mlflow_run_id else ""
    return finish(ExitCode.OK, f"trained: {plan.output} is complete{where}")


def open_run_record(plan: TrainPlan, decision: Decision, nproc: int) -> RunRecord:
    """Make the output ours for this attempt: move an old one aside when asked, check a resume can use the
    checkpoints' layout, write run.json and the generated dataset_info."""
    settings = plan.settings
    deepspeed = plan.lf_args.get("deepspeed")
    layout = {"world_size": settings.nnodes * nproc, "deepspeed": Path(deepspeed).name if deepspeed else None}
    if decision.replace_first:
        moved = move_aside(plan.output)
        log.warning("moved the previous output to %s", moved)
    previous = observe_output(plan.output).run or {}
    problem = checkpoint_layout_problem(previous.get("layout"), layout) if decision.action is Action.RESUME else None
    if problem:
        raise ConfigError(f"LORA_OUTPUT_PATH={str(plan.output)!r}: {problem}")
    record = RunRecord({
        "fingerprint": plan.fingerprint,
        "inputs": plan.fingerprint_inputs,
        "started_at": time.time(),
        "attempt": int(previous.get("attempt", 0)) + 1 if decision.action is Action.RESUME else 1,
        "mlflow_run_id": previous.get("mlflow_run_id") if previous.get("fingerprint") == plan.fingerprint else None,
        "layout": layout,  # what its checkpoints can be resumed with
    })
    plan.output.mkdir(parents=True, exist_ok=True)
    write_run_record(plan, record)  # the first file of this attempt: whatever follows is recognisably ours
    datasets.write_generated_info(plan.data)
    return record


def write_run_record(plan: TrainPlan, record: RunRecord) -> RunRecord:
    atomic_write_json(state_dir(plan.output) / RUN_FILE, record.data)
    return record


def run_tags(plan: TrainPlan) -> dict[str, str]:
    settings = plan.settings
    tags = {
        "output_path": str(plan.output),
        "fingerprint": plan.fingerprint,
        "finetuning_type": settings.finetuning_type,
        "job_name": settings.job_name,
        "pod_name": settings.pod_name,
        "image": settings.image,
    }
    return {k: v for k, v in tags.items() if v}


def mark_complete(plan: TrainPlan, record: RunRecord, template: dict[str, Any], synced: bool) -> None:
    write_marker(plan.output, {
        "fingerprint": plan.fingerprint,
        "inputs": plan.fingerprint_inputs,
        "finished_at": time.time(),
        "finetuning_type": plan.settings.finetuning_type,
        "template": template,  # its stop words: where the published model must stop
        "mlflow_run_id": record.mlflow_run_id,
        "mlflow_synced": synced,  # False until the MLflow run holds everything (see tracking.repair_run)
        "files": check_outputs(plan.output, plan.lf_args.get("finetuning_type") == "lora"),
        "results": run_results(plan.output),
        "data_statistics": data_statistics(plan),  # the published model's lineage: the merge reads them here
    })


def data_statistics(plan: TrainPlan) -> dict[str, Any]:
    """Records and tokens of the data just trained on, measured once here, where LLaMA-Factory is loaded
    anyway, and not in every merge Job. Never fatal: the training is complete whatever they say."""
    from entrypoint.lineage import plan_statistics

    try:
        return plan_statistics(plan)
    except Exception as exc:  # informational only: a completed training must be marked complete
        log.warning("could not measure the training data's token statistics: %s", exc)
        return {"error": str(exc)}


def mark_synced(output: Path) -> None:
    marker = read_marker(output)
    if marker is not None and not marker.get("mlflow_synced"):
        write_marker(output, {**marker, "mlflow_synced": True})


def record_results(plan: TrainPlan, tracker: Tracker | NullTracker, t0: float) -> None:
    for name in ARTIFACTS:
        tracker.log_artifact(plan.output / name)
    tracker.log_metrics({"wall_seconds": time.monotonic() - t0}, step=0)


def train_follower(plan: TrainPlan, decision: Decision) -> int:
    """A node other than node 0: no lock, nothing written to the storage. Its processes join node 0's
    rendezvous and train with global rank 0's arguments; it succeeds once node 0 has marked the output
    complete, so the Job succeeds only when the output is complete."""
    from entrypoint import tokenized, worker

    settings = plan.settings
    node = f"node {settings.node_rank} of {settings.nnodes}"
    log.info("%s: %s (fingerprint %s); joining node 0 at %s:%d", node, decision.reason, plan.fingerprint[:12],
             settings.master_addr, settings.master_port)
    args = tokenized.prepare(plan, worker.launch_args(plan, decision))  # waits for node 0 to tokenize
    result = worker.launch_torchrun(plan, args, worker.procs_per_node(settings), None, None)
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
