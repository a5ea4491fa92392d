"""Running the training: the launcher (in this process, or torchrun across processes and nodes) and the
training process itself (LLaMA-Factory's run_exp with our callback).

Imported only once the decision is to train: this is where torch, transformers and llamafactory load.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from entrypoint.errors import ConfigError, EntrypointError, ExitCode, Interrupted, TemporaryFailure
from entrypoint.files import atomic_write_json, read_json
from entrypoint.settings import Settings, process_env
from entrypoint.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from entrypoint.decisions import Decision
    from entrypoint.plan import TrainPlan

log = logging.getLogger("entrypoint")


class StopFlag:
    """Set by SIGTERM. Before training starts the signal interrupts at once; during training the
    callback stops at the next step boundary (a half-finished step is never saved)."""

    def __init__(self) -> None:
        self.requested = False
        self.in_training = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        log.warning("SIGTERM received: stopping at the next step boundary")
        if not self.in_training:
            raise Interrupted("SIGTERM before training started; nothing was saved")


class JobCallback(TrainerCallback):
    """Stops on SIGTERM (checkpoint first when asked), saves every `save_minutes` whatever the step time,
    notices a lost lock, feeds MLflow on rank 0."""

    def __init__(
        self,
        stop: StopFlag,
        checkpoint_on_stop: bool,
        tracker: Tracker | NullTracker,
        lock_lost: threading.Event | None = None,
        save_minutes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stop = stop
        self.checkpoint_on_stop = checkpoint_on_stop
        self.tracker = tracker
        self.lock_lost = lock_lost
        self.save_seconds = save_minutes * 60
        self.clock = clock
        self.stopping = False
        self.global_step = 0
        self._last_log = (0, clock())
        self._last_save = clock()

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.in_training = True
        self._last_log = (state.global_step, self.clock())
        self._last_save = self.clock()

    def on_train_end(self, args, state, control, **kwargs):
        self.stop.in_training = False
        self.global_step = state.global_step

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
            raise TemporaryFailure("another run took over the output lock; stopped without saving")
        save_due = 0 < self.save_seconds <= self.clock() - self._last_save
        stop, save_due = self._everywhere(args, self.stop.requested, save_due)
        if save_due:
            # Whatever the step time, a preemption loses at most SAVE_MINUTES of training.
            control.should_save = True
        if stop:
            self.stopping = True
            if not self.checkpoint_on_stop:
                raise Interrupted(f"SIGTERM at step {state.global_step}; stopped without a checkpoint "
                                  "(CHECKPOINT_ON_SIGTERM)")
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last_save = self.clock()
        if self.stopping:
            # The checkpoint is complete (trainer_state.json was written): leave before the final save,
            # which would make an interrupted run look finished.
            raise Interrupted(f"SIGTERM: saved checkpoint-{state.global_step}; the rerun resumes from it")
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
    """PRECISION=auto becomes bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    args = dict(args)
    precision = args.pop("precision", "auto")
    if precision == "auto" and not torch.cuda.is_available():
        precision = "fp32"
    elif precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision in ("bf16", "fp16"):
        args[precision] = True
    return args


def train(
    lf_args: dict[str, Any],
    checkpoint_on_stop: bool,
    stop: StopFlag,
    tracker: Tracker | NullTracker,
    lock_lost: threading.Event | None = None,
    save_minutes: int = 0,
) -> int:
    """Run LLaMA-Factory; returns the global step reached once training and the final save finished."""
    from llamafactory.train.tuner import run_exp

    callback = JobCallback(stop, checkpoint_on_stop, tracker, lock_lost, save_minutes)
    run_exp(resolve_precision(lf_args), callbacks=[callback])
    return callback.global_step


def check_args(lf_args: dict[str, Any]) -> dict[str, Any]:
    """Let LLaMA-Factory parse the arguments before anything is written: unknown or contradictory keys
    (typically from LLAMAFACTORY_CONFIG) are a configuration error, not a crash mid-run. Returns what the
    chat template does to the tokenizer (check_template)."""
    from llamafactory.hparams import get_train_args

    template = check_template(lf_args.get("template"))
    args = resolve_precision(lf_args)
    args["overwrite_output_dir"] = True  # parse only: keep its resume probe away from the output
    # LLaMA-Factory accepts DeepSpeed only inside a distributed process; the training processes parse it
    # for real, and plan.check_deepspeed_possible has checked the file and the package.
    args.pop("deepspeed", None)
    try:
        get_train_args(args)
    except ValueError as exc:
        raise ConfigError(f"LLaMA-Factory rejected the arguments: {exc}") from exc
    return template


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
    from entrypoint.errors import exit_code_for, write_termination_log

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    proc = process_env()
    if proc.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    stop = StopFlag()
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
        step = train(spec["lf_args"], spec["checkpoint_on_stop"], stop, tracker, save_minutes=settings.save_minutes)
        code, message = 0, "ok"
    except BaseException as exc:  # reported to the launcher through the result file
        code, message = int(exit_code_for(exc)), f"{type(exc).__name__}: {exc}"
        log.error("rank %d failed: %s", proc.rank, message)
    finally:
        tracker.close(None, timeout=30)
        if code == 0:
            leave_process_group()
    if proc.local_rank == 0:
        atomic_write_json(Path(spec["result_path"]), {
            "code": code, "message": message, "rank": proc.rank, "world_size": proc.world_size, "global_step": step,
        })
    if code:
        write_termination_log(message)
    sys.stdout.flush()
    return code


# The launcher: node 0's process (and, with several nodes, each other node's) starts the training here.

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
                 lock_lost: threading.Event) -> None:
    """Node 0's training, in this process or under torchrun; returns once the final weights are saved."""
    args = launch_args(plan, decision)
    if uses_torchrun(plan, nproc):
        launch_torchrun(plan, args, nproc, tracker.run_id)
        return
    stop = StopFlag()
    stop.install()
    train(args, checkpoint_on_stop(plan.settings), stop, tracker, lock_lost, plan.settings.save_minutes)


def launch_torchrun(plan: TrainPlan, args: dict[str, Any], nproc: int, mlflow_run_id: str | None) -> dict[str, Any]:
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
        result = read_json(result_path) or {}
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
