"""Running the training: the launcher (in this process, or torchrun across processes and nodes) and the
training process itself (LLaMA-Factory's run_exp with our callback).

Imported only once the decision is to train: this is where torch, transformers and llamafactory load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from entrypoint.errors import (
    ConfigError,
    EntrypointError,
    ExitCode,
    GpuOutOfMemory,
    Interrupted,
    TemporaryFailure,
)
from entrypoint.files import atomic_write_json, read_json
from entrypoint.settings import Settings, process_env
from entrypoint.storage import LockToken, OutputLock, write_checkpoint_record
from entrypoint.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from entrypoint.decisions import Decision
    from entrypoint.plan import TrainPlan

log = logging.getLogger("entrypoint")


# Seconds kept free before the end of the grace period, so the process exits on its own (143, with its
# termination message) instead of being killed (137, message lost).
EXIT_MARGIN_SECONDS = 4.0


class StopFlag:
    """Set by SIGTERM. Before training starts, and while the final weights are saved, the signal interrupts at
    once; during training the callback stops at the next step boundary (a half-finished step is never saved).
    Everything after the signal must end within the pod's grace period (TERMINATION_GRACE_SECONDS)."""

    def __init__(self, grace_seconds: float = 15.0) -> None:
        self.grace_seconds = grace_seconds
        self.requested_at: float | None = None
        self.phase = "starting"  # starting | training | finishing

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    @property
    def deadline(self) -> float | None:
        if self.requested_at is None:
            return None
        return self.requested_at + max(1.0, self.grace_seconds - EXIT_MARGIN_SECONDS)

    def interrupted(self, message: str) -> Interrupted:
        return Interrupted(message, deadline=self.deadline)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
        if self.phase == "starting":
            raise self.interrupted("SIGTERM before training started; nothing was saved")
        if self.phase == "finishing":
            raise self.interrupted("SIGTERM while the final weights were being saved: the output is not marked "
                                   "complete, and the rerun resumes from the last complete checkpoint")
        log.warning("SIGTERM received: stopping at the next step boundary")


class JobCallback(TrainerCallback):
    """Stops on SIGTERM (checkpoint first when asked), saves every `save_minutes` whatever the step time,
    writes nothing once the output lock is lost, records each checkpoint as complete once saved, feeds MLflow
    on rank 0."""

    def __init__(
        self,
        stop: StopFlag,
        checkpoint_on_stop: bool,
        tracker: Tracker | NullTracker,
        lock: LockToken | None = None,
        lock_lost: threading.Event | None = None,
        save_minutes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stop = stop
        self.checkpoint_on_stop = checkpoint_on_stop
        self.tracker = tracker
        self.lock = lock
        self.lock_lost = lock_lost
        self.save_seconds = save_minutes * 60
        self.clock = clock
        self.stopping = False
        self.global_step = 0
        self._last_log = (0, clock())
        self._last_save = clock()

    def _check_lock(self) -> None:
        """Before anything is saved: the lock must still be ours (its file says so, not only the heartbeat)."""
        if self.lock_lost is not None and self.lock_lost.is_set() and self.lock is None:
            raise TemporaryFailure("another run took over the output lock; stopped without saving")
        if self.lock is not None:
            self.lock.check()

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.phase = "training"
        self._last_log = (state.global_step, self.clock())
        self._last_save = self.clock()

    def on_train_end(self, args, state, control, **kwargs):
        # Next come the final weights and, in the launcher, the completion marker.
        self._check_lock()
        self.stop.phase = "finishing"
        self.global_step = state.global_step
        if self.stop.requested:
            raise self.stop.interrupted("SIGTERM at the end of training: the rerun resumes from the last "
                                        "complete checkpoint")

    def _everywhere(self, args: Any, *flags: bool) -> tuple[bool, ...]:
        """All ranks must stop, and save, at the same step, or the next collective hangs: each flag is true
        everywhere once it is true on any rank."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            tensor = torch.tensor([1 if f else 0 for f in flags], device=args.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            return tuple(bool(v) for v in tensor.tolist())
        return flags

    def on_step_end(self, args, state, control, **kwargs):
        if self.lock_lost is not None and self.lock_lost.is_set():
            self._check_lock()
        save_due = 0 < self.save_seconds <= self.clock() - self._last_save
        stop, save_due = self._everywhere(args, self.stop.requested, save_due)
        if save_due:
            # Whatever the step time, a preemption loses at most SAVE_MINUTES of training.
            control.should_save = True
        if stop:
            self.stopping = True
            if not self.checkpoint_on_stop:
                raise self.stop.interrupted(f"SIGTERM at step {state.global_step}; stopped without a checkpoint "
                                            "(CHECKPOINT_ON_SIGTERM)")
            control.should_save = True
            control.should_training_stop = True
        if control.should_save:
            self._check_lock()
        return control

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        self._last_save = self.clock()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank's part of the checkpoint is on the storage
        if state.is_world_process_zero:
            write_checkpoint_record(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        if self.stopping:
            # The checkpoint is complete: leave before the final save, which would make an interrupted run
            # look finished.
            raise self.stop.interrupted(f"SIGTERM: saved checkpoint-{state.global_step}; the rerun resumes from it")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        step0, t0 = self._last_log
        now = time.monotonic()
        if state.global_step > step0 and now > t0:
            metrics["steps_per_second"] = (state.global_step - step0) / (now - t0)
            metrics["samples_per_second"] = metrics["steps_per_second"] * args.train_batch_size * \
                args.gradient_accumulation_steps * args.world_size
        self._last_log = (state.global_step, now)
        self.tracker.log_metrics(metrics, state.global_step)
        return control


def resolve_precision(args: dict[str, Any]) -> dict[str, Any]:
    """PRECISION=auto becomes bf16 where the GPU computes it natively (Ampere and later), fp16 on older GPUs
    (T4, V100: torch can emulate bf16 there, slowly, and counts that as supported by default), fp32 on CPU."""
    import torch

    args = dict(args)
    precision = args.pop("precision", "auto")
    if precision == "auto" and not torch.cuda.is_available():
        precision = "fp32"
    elif precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision in ("bf16", "fp16"):
        args[precision] = True
    return args


def train(
    lf_args: dict[str, Any],
    checkpoint_on_stop: bool,
    stop: StopFlag,
    tracker: Tracker | NullTracker,
    lock: LockToken | None = None,
    lock_lost: threading.Event | None = None,
    save_minutes: int = 0,
) -> int:
    """Run LLaMA-Factory; returns the global step reached once training and the final save finished."""
    from llamafactory.train.tuner import run_exp

    callback = JobCallback(stop, checkpoint_on_stop, tracker, lock, lock_lost, save_minutes)
    run_exp(resolve_precision(lf_args), callbacks=[callback])
    return callback.global_step


def check_args(lf_args: dict[str, Any]) -> dict[str, Any]:
    """Let LLaMA-Factory parse the arguments before anything is written: unknown or contradictory keys
    (typically from LLAMAFACTORY_CONFIG) are a configuration error, not a crash mid-run. Returns what the
    chat template does to the tokenizer (check_template)."""
    from llamafactory.hparams import get_train_args

    template = check_template(lf_args.get("template"))
    args = resolve_precision(lf_args)
    check_types(args)
    args["overwrite_output_dir"] = True  # parse only: keep its resume probe away from the output
    # LLaMA-Factory accepts DeepSpeed only inside a distributed process; the training processes parse it
    # for real, and plan.check_deepspeed_possible has checked the file and the package.
    args.pop("deepspeed", None)
    try:
        get_train_args(args)
    except ValueError as exc:
        raise ConfigError(f"LLaMA-Factory rejected the arguments: {exc}") from exc
    return template


def check_types(args: dict[str, Any]) -> None:
    """Each argument of the type LLaMA-Factory declares: its parser hands values to its dataclasses as they
    are, so `logging_first_step: sometimes` from a YAML would be truthy, and `lora_rank: abc` would fail only
    once the model is built."""
    import typing

    from llamafactory.hparams import DataArguments, FinetuningArguments, ModelArguments, TrainingArguments

    declared: dict[str, Any] = {}
    for cls in (DataArguments, FinetuningArguments, ModelArguments, TrainingArguments):
        declared.update(typing.get_type_hints(cls))
    problems = []
    for key, value in args.items():
        expected = _expected_type(declared.get(key))
        if expected is not None and not _has_type(value, expected[0]):
            problems.append(f"{key}={value!r} is not valid: expected {expected[1]}")
    if problems:
        raise ConfigError("LLaMA-Factory rejected the arguments: " + "; ".join(problems))


_SIMPLE_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _expected_type(declared: Any) -> tuple[type, str] | None:
    """(type, its name) for bool/int/float/str and Optional of them; None for anything else (not checked)."""
    import typing

    args = [a for a in typing.get_args(declared) if a is not type(None)]
    simple = args[0] if typing.get_origin(declared) in (typing.Union, types.UnionType) and len(args) == 1 else declared
    return (simple, _SIMPLE_TYPES[simple]) if simple in _SIMPLE_TYPES else None


def _has_type(value: Any, expected: type) -> bool:
    if value is None:
        return True  # Optional, or the dataclass's own default handling
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def check_model_type(config: Any, trust_remote_code: bool) -> None:
    """A base transformers can build: a model type it knows, or custom code the user allowed to run."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING_NAMES:
        return
    if not config.get("auto_map"):
        raise ConfigError(f"the base model's model_type {model_type!r} is not one transformers {_version()} knows, "
                          "and the model ships no code for it (config.json has no auto_map): it cannot be trained")
    if not trust_remote_code:
        raise ConfigError(f"the base model's model_type {model_type!r} is not one transformers {_version()} knows: "
                          "it needs the Python code it ships (config.json auto_map). Read that code, then set "
                          "TRUST_REMOTE_CODE=true to run it")


def _version() -> str:
    import transformers

    return transformers.__version__


def check_template(name: Any) -> dict[str, Any]:
    """The chat template, checked against LLaMA-Factory's registry (it would fail only once training starts),
    and what it does to the tokenizer: its stop words, the first of which replaces the EOS when replace_eos.
    The merge publishes a generation config that stops at them (companions.py)."""
    import difflib

    from llamafactory.data.template import TEMPLATES

    if name not in TEMPLATES:
        close = difflib.get_close_matches(str(name), TEMPLATES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"TEMPLATE={name!r} is not a LLaMA-Factory chat template{hint}: expected one of its "
                          f"{len(TEMPLATES)} templates, e.g. llama3, qwen, qwen3, gemma, mistral, phi4, default")
    template = TEMPLATES[name]
    return {"name": name, "stop_words": list(template.stop_words), "replace_eos": bool(template.replace_eos)}


def follow_rank_zero(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec every rank trains with: global rank 0's.

    Node 0's launcher decided under the output lock (resume point, fresh start) and opened the MLflow run;
    another node's launcher decided from what it saw on the storage, which can lag behind (NFS caches a
    directory listing for up to a minute; a pod of the previous attempt may still have been finishing a
    checkpoint). Ranks that resumed from different checkpoints would deadlock or train garbage, so the
    arguments are taken from rank 0, over the process group that training uses anyway.
    """
    proc = process_env()
    if proc.world_size == 1:
        return spec
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    backend = "gloo"
    if torch.cuda.is_available():  # what transformers would pick; NCCL needs each rank on its own GPU first
        backend = "nccl"
        torch.cuda.set_device(proc.local_rank)
    # transformers (through accelerate) reuses an initialised process group, so this timeout is the one
    # training runs with: ddp_timeout, as LLaMA-Factory would have set it.
    timeout = timedelta(seconds=float(spec["lf_args"].get("ddp_timeout", 1800)))
    dist.init_process_group(backend, timeout=timeout)
    box = [{"lf_args": spec["lf_args"], "mlflow_run_id": spec["mlflow_run_id"]}]
    dist.broadcast_object_list(box, src=0)
    leader = box[0]
    if leader["lf_args"] != spec["lf_args"]:
        changed = sorted(k for k in set(leader["lf_args"]) | set(spec["lf_args"])
                         if leader["lf_args"].get(k) != spec["lf_args"].get(k))
        log.warning("rank %s: this node decided differently from node 0 on %s; following node 0",
                    proc.rank, ", ".join(changed))
    return {**spec, **leader}


def leave_process_group() -> None:
    """Destroy the process group, if any, before the process exits: a gloo group still alive at interpreter
    exit can abort it ("terminate called without an active exception", exit -6) after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def allow_cpu_index_on_load() -> None:
    """Let a CPU run with several processes resume from a checkpoint.

    accelerate gives each CPU process the device "cpu:0", and transformers loads the optimizer state with
    map_location=that device once the world size is above 1; torch.load knows "cpu" but not "cpu:0" and
    refuses. A storage bound for cpu:N belongs on the CPU. (On GPUs the device is "cuda:N", which torch
    knows: this is never needed there.) Priority 99: asked only after torch's own locations.
    """
    import torch

    torch.serialization.register_package(
        99, lambda obj: None, lambda obj, location: obj if location.startswith("cpu:") else None)


def main(spec_path: str, settings: Settings) -> int:
    """One rank under torchrun: `python -m entrypoint _worker SPEC`. Global rank 0 feeds MLflow; each node's
    local rank 0 reports to that node's launcher through the result file."""
    from entrypoint.errors import describe, write_termination_log

    die_with_parent(signal.SIGKILL)  # torchrun gone (killed with its launcher): this rank goes too
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    proc = process_env()
    if proc.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    stop = StopFlag(settings.termination_grace_seconds)
    stop.install()
    tracker: Tracker | NullTracker = NullTracker()
    step = None
    try:
        spec = follow_rank_zero(spec)
        import torch

        if proc.world_size > 1 and not torch.cuda.is_available():
            allow_cpu_index_on_load()
        if proc.rank == 0 and spec.get("mlflow_run_id"):
            tracker = Tracker(settings.mlflow_tracking_uri, settings.mlflow_timeout_seconds)
            tracker.attach(spec["mlflow_run_id"])
        lock = LockToken(**spec["lock"]) if spec.get("lock") else None
        step = train(spec["lf_args"], spec["checkpoint_on_stop"], stop, tracker, lock,
                     save_minutes=settings.save_minutes)
        code, message = 0, "ok"
    except BaseException as exc:  # reported to the launcher through the result file
        failure, message = describe(exc)
        code = int(failure)
        log.error("rank %d failed: %s", proc.rank, message)
    finally:
        tracker.close(None, timeout=30)
        if code == 0:
            leave_process_group()
    if proc.local_rank == 0 or code:
        # Local rank 0 always reports; another rank only its own failure, which may be the cause (its GPU ran out
        # of memory) while local rank 0 saw only the consequence (its peer gone).
        result_path = Path(spec["result_path"])
        atomic_write_json(result_path if proc.local_rank == 0 else rank_failure_path(result_path, proc.local_rank), {
            "code": code, "message": message, "rank": proc.rank, "world_size": proc.world_size, "global_step": step,
        })
    if code:
        write_termination_log(message)
    sys.stdout.flush()
    return code


def rank_failure_path(result_path: Path, local_rank: int) -> Path:
    return result_path.with_name(f"failed-{local_rank}.json")


# The launcher: node 0's process (and, with several nodes, each other node's) starts the training here.

def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send `signum` to this process when its parent exits (PR_SET_PDEATHSIG): the launcher's
    torchrun, and torchrun's ranks, never outlive a launcher killed with SIGKILL."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signum, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
        log.warning("could not set a parent-death signal (errno %d)", ctypes.get_errno())

def checkpoint_on_stop(settings: Settings) -> bool:
    if settings.checkpoint_on_sigterm == "auto":
        return settings.finetuning_type in ("lora", "qlora")
    return settings.checkpoint_on_sigterm == "true"


def procs_per_node(settings: Settings) -> int:
    if settings.nproc_per_node != "auto":
        return int(settings.nproc_per_node)
    import torch

    return max(1, torch.cuda.device_count())


def launch_args(plan: TrainPlan, decision: Decision) -> dict[str, Any]:
    """LLaMA-Factory's arguments for this decision: where to resume from, whether to start afresh."""
    from entrypoint.decisions import Action

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


def run_training(plan: TrainPlan, decision: Decision, nproc: int, tracker: Tracker | NullTracker,
                 lock: OutputLock) -> None:
    """Node 0's training, in this process or under torchrun; returns once the final weights are saved."""
    from entrypoint import tokenized

    stop = StopFlag(plan.settings.termination_grace_seconds)
    stop.install()  # SIGTERM while tokenizing: exit 143, nothing published
    args = tokenized.prepare(plan, launch_args(plan, decision), lock.token_check.check)
    if uses_torchrun(plan, nproc):
        launch_torchrun(plan, args, nproc, tracker.run_id, lock.token_check)
        return
    train(args, checkpoint_on_stop(plan.settings), stop, tracker, lock.token_check, lock.lost,
          plan.settings.save_minutes)


def launch_torchrun(plan: TrainPlan, args: dict[str, Any], nproc: int, mlflow_run_id: str | None,
                    lock: LockToken | None) -> dict[str, Any]:
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
            "lock": dataclasses.asdict(lock) if lock else None,
            "result_path": str(result_path),
        })
        command = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
                   "--max-restarts=0", "-m", "entrypoint", "_worker", str(spec_path)]
        log.info("launching %d processes: %s", nproc, " ".join(command))
        # Its own session, so the signal reaches torchrun and every rank as one group; and torchrun dies with
        # this launcher (a parent-death signal), whatever kills it: no rank trains on once its launcher is gone.
        child = subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent)
        sigterm_at: float | None = None

        def forward(signum: int, frame: Any) -> None:
            nonlocal sigterm_at
            sigterm_at = sigterm_at or time.monotonic()
            os.killpg(child.pid, signal.SIGTERM)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            code = child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        result = read_json(result_path) or {}
        failures = [f for f in [result, *(read_json(p) for p in sorted(Path(tmp).glob("failed-*.json")))]
                    if f and f.get("code")]
    if code == 0 and result.get("code") == 0:
        return result
    raise torchrun_failure(code, result, failures, sigterm_at, settings.termination_grace_seconds)


def torchrun_failure(code: int, result: dict[str, Any], failures: list[dict[str, Any]], sigterm_at: float | None,
                     grace_seconds: int) -> EntrypointError:
    """What a failed torchrun means, from its exit code and the ranks' reports."""
    message = result.get("message") or (
        f"torchrun exited with {code} before this node's first process reported: a training process was killed "
        "(host memory: OOMKilled; or NCCL's watchdog, after a collective outlived DDP_TIMEOUT) or lost its peers "
        "on another node; see the log above")
    grace = max(1.0, grace_seconds - EXIT_MARGIN_SECONDS)
    if sigterm_at is not None:
        return Interrupted(message, deadline=sigterm_at + grace)
    # The cause before its consequences: a configuration error or a GPU out of memory on any rank (torchrun then
    # stops the others with SIGTERM, and a rank that saved a checkpoint on it reports an interruption).
    for cause_class in (ConfigError, GpuOutOfMemory):
        cause = next((f for f in failures if f["code"] == cause_class.exit_code), None)
        if cause:
            return cause_class(cause["message"])
    if result.get("code") == ExitCode.INTERRUPTED:
        return Interrupted(message, deadline=time.monotonic() + grace)
    return EntrypointError(message)
