"""What to do with an output directory: pure functions of (fingerprint, observed state, options).

The caller observes the storage (observe_output) and performs the side effects; the decision itself is
tested without a model or a GPU.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint.files import read_json
from entrypoint.storage import MARKER, RUN_FILE, STATE_DIR, LockInfo, checkpoint_problem, lock_path_for

if TYPE_CHECKING:
    from entrypoint.plan import TrainPlan

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


class Action(enum.Enum):
    SKIP = "skip"  # complete output from the same config: nothing to do
    START = "start"  # train from the beginning
    RESUME = "resume"  # continue from a checkpoint of the same config
    REFUSE = "refuse"  # output from another config or another tool: never overwrite it


@dataclass(frozen=True)
class OutputState:
    exists: bool = False
    empty: bool = True  # nothing in it but, at most, our own state directory without a run record
    is_file: bool = False
    marker: dict[str, Any] | None = None
    run: dict[str, Any] | None = None  # our run.json: started fingerprint, MLflow run id
    checkpoints: tuple[int, ...] = ()  # complete ones, ascending
    incomplete_checkpoints: tuple[int, ...] = ()
    locked_by: str | None = None  # the owner of a live lock on the output: a run in progress


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    checkpoint: int | None = None
    replace_first: bool = False  # move the existing output aside before starting
    fresh_dir: bool = False  # starting over in our own partial output: let LLaMA-Factory overwrite it
    changed: tuple[str, ...] = field(default_factory=tuple)


def checkpoint_complete(path: Path) -> bool:
    """Every file of the checkpoint as the training process recorded it once saved (storage.CHECKPOINT_RECORD)."""
    return checkpoint_problem(path) is None


def observe_output(output: Path) -> OutputState:
    if not output.is_dir():
        exists = output.exists() or output.is_symlink()
        return OutputState(exists=exists, empty=not exists, is_file=exists)
    entries = [p for p in output.iterdir()]
    state = output / STATE_DIR
    marker, run = read_json(state / MARKER), read_json(state / RUN_FILE)
    complete, incomplete = [], []
    for entry in entries:
        match = CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir():
            (complete if checkpoint_complete(entry) else incomplete).append(int(match.group(1)))
    holder = LockInfo.parse(read_json(lock_path_for(output)))
    return OutputState(
        locked_by=holder.owner if holder is not None and holder.expires_at > time.time() else None,
        exists=True,
        empty=all(e.name == STATE_DIR for e in entries) and marker is None and run is None,
        marker=marker,
        run=run,
        checkpoints=tuple(sorted(complete)),
        incomplete_checkpoints=tuple(sorted(incomplete)),
    )


def changed_keys(old: dict[str, Any] | None, new: dict[str, Any]) -> tuple[str, ...]:
    """Which fingerprint inputs differ: names for the refusal message."""
    if not old:
        return ()
    out = []
    for section in ("args", "model", "data"):
        a, b = old.get(section) or {}, new.get(section) or {}
        if section == "args":
            out += [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append("base model" if section == "model" else "dataset")
    return tuple(out)


def decide_train(fingerprint: str, inputs: dict[str, Any], state: OutputState, replace: bool) -> Decision:
    if state.is_file:
        return Decision(Action.REFUSE, "it is a file, not a directory; nothing was changed. Use a directory for "
                        "LORA_OUTPUT_PATH (it is created when missing)")
    if not state.exists or state.empty:
        return Decision(Action.START, "no previous output")
    what = ""
    if state.marker is not None:
        if state.marker.get("fingerprint") == fingerprint:
            return Decision(Action.SKIP, "already complete with the same configuration")
        changed = changed_keys(state.marker.get("inputs"), inputs)
        what = "a complete output made with a different configuration"
    elif state.run is not None:
        if state.run.get("fingerprint") == fingerprint:
            if state.checkpoints:
                n = state.checkpoints[-1]
                newer = [c for c in state.incomplete_checkpoints if c > n]
                skipped = (f" (checkpoint-{', checkpoint-'.join(map(str, newer))} incomplete, skipped)"
                           if newer else "")
                return Decision(Action.RESUME, f"interrupted run: resuming from checkpoint-{n}{skipped}",
                                checkpoint=n)
            why = " (no complete checkpoint)" if state.incomplete_checkpoints else ""
            return Decision(Action.START, f"interrupted before the first checkpoint{why}: starting over",
                            fresh_dir=True)
        changed = changed_keys(state.run.get("inputs"), inputs)
        if state.locked_by is not None:
            what = f"a run in progress with a different configuration (its lock is held by {state.locked_by})"
        elif not state.checkpoints and not state.incomplete_checkpoints:
            # A start that failed before its first checkpoint (a value fixed since) holds no result to keep.
            return Decision(Action.START, "the output holds only a failed start of another configuration (no "
                            "checkpoint, no result): starting over with this one", fresh_dir=True, changed=changed)
        else:
            what = "an interrupted run with a different configuration"
    else:
        changed = ()
        what = "files this tool did not write"
    if replace:
        return Decision(Action.START, f"output holds {what}: moving it aside (REPLACE_OUTPUT=true)",
                        replace_first=True, changed=changed)
    detail = f" (changed: {', '.join(changed)})" if changed else ""
    return Decision(
        Action.REFUSE,
        f"the output directory holds {what}{detail}; nothing was changed. Use another LORA_OUTPUT_PATH, "
        "or set REPLACE_OUTPUT=true to move the old output aside (renamed, not deleted) and train anew",
        changed=changed,
    )


def decide(plan: TrainPlan, holding_lock: bool = False) -> Decision:
    """The decision for a training plan, from what its output directory holds now (a lock this very run holds
    is no other run in progress)."""
    state = observe_output(plan.output)
    if holding_lock:
        state = dataclasses.replace(state, locked_by=None)
    return decide_train(plan.fingerprint, plan.fingerprint_inputs, state, plan.settings.replace_output)


def checkpoint_layout_problem(previous: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Why checkpoints written with the `previous` layout (run.json) cannot be resumed with `current`, if so.

    A layout is the number of training processes and the DeepSpeed config. DeepSpeed saves optimizer state
    (with ZeRO-3 the weights too) partitioned per process and loads it only into the same number of processes
    with the same stage; without DeepSpeed a checkpoint holds whole tensors and resumes on any layout.
    """
    if not previous or previous == current or not (previous.get("deepspeed") or current.get("deepspeed")):
        return None
    return (
        f"its checkpoints were written by {_describe(previous)} and this run has {_describe(current)}; DeepSpeed "
        "checkpoints resume only into the layout that wrote them. Finish the run with the NNODES, GPUs per pod "
        "and DEEPSPEED it started with, or train into another LORA_OUTPUT_PATH"
    )


def _describe(layout: dict[str, Any]) -> str:
    engine = f"DeepSpeed ({layout['deepspeed']})" if layout.get("deepspeed") else "no DeepSpeed"
    size = layout.get("world_size")
    return f"{size} process{'' if size == 1 else 'es'} with {engine}"
