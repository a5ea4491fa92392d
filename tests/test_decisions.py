"""The skip / start / resume / refuse decision as a pure function, and what observe_output sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from entrypoint.decisions import (
    Action,
    OutputState,
    changed_keys,
    checkpoint_layout_problem,
    decide_train,
    observe_output,
)

FP = "f" * 64
INPUTS = {"args": {"lora_rank": 8, "template": "llama3"}, "model": {"config.json": "a"}, "data": {"x": 1}}
OTHER = {"args": {"lora_rank": 16, "template": "llama3"}, "model": {"config.json": "a"}, "data": {"x": 2}}


@pytest.mark.parametrize(
    ("state", "replace", "action", "checkpoint", "replace_first", "fresh"),
    [
        (OutputState(), False, Action.START, None, False, False),
        (OutputState(exists=True, empty=True), False, Action.START, None, False, False),
        (OutputState(exists=True, empty=False, marker={"fingerprint": FP}), False, Action.SKIP, None, False, False),
        (OutputState(exists=True, empty=False, marker={"fingerprint": "x", "inputs": OTHER}), False,
         Action.REFUSE, None, False, False),
        (OutputState(exists=True, empty=False, marker={"fingerprint": "x"}), True, Action.START, None, True, False),
        (OutputState(exists=True, empty=False, run={"fingerprint": FP}, checkpoints=(10, 20)), False,
         Action.RESUME, 20, False, False),
        (OutputState(exists=True, empty=False, run={"fingerprint": FP}, checkpoints=(10,),
                     incomplete_checkpoints=(20,)), False, Action.RESUME, 10, False, False),
        (OutputState(exists=True, empty=False, run={"fingerprint": FP}), False, Action.START, None, False, True),
        (OutputState(exists=True, empty=False, run={"fingerprint": "x"}, checkpoints=(10,)), False,
         Action.REFUSE, None, False, False),
        (OutputState(exists=True, empty=False, run={"fingerprint": "x"}, checkpoints=(10,)), True,
         Action.START, None, True, False),
        (OutputState(exists=True, empty=False), False, Action.REFUSE, None, False, False),
        (OutputState(exists=True, empty=False), True, Action.START, None, True, False),
    ],
    ids=["nothing", "empty-dir", "complete-same", "complete-other", "complete-other-replace", "resume-latest",
         "resume-skips-torn-checkpoint", "partial-no-checkpoint", "partial-other", "partial-other-replace",
         "foreign-files", "foreign-files-replace"],
)
def test_decide_train(state, replace, action, checkpoint, replace_first, fresh):
    decision = decide_train(FP, INPUTS, state, replace)
    assert decision.action is action
    assert decision.checkpoint == checkpoint
    assert decision.replace_first is replace_first
    assert decision.fresh_dir is fresh
    if action is Action.REFUSE:
        assert "REPLACE_OUTPUT=true" in decision.reason and "nothing was changed" in decision.reason


def test_refusal_names_what_changed():
    state = OutputState(exists=True, empty=False, marker={"fingerprint": "x", "inputs": OTHER})
    decision = decide_train(FP, INPUTS, state, replace=False)
    assert decision.changed == ("lora_rank", "dataset")
    assert "changed: lora_rank, dataset" in decision.reason
    assert changed_keys(None, INPUTS) == ()


def test_observe_output_tells_complete_from_torn_checkpoints(tmp_path: Path):
    out = tmp_path / "out"
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (out / "checkpoint-20").mkdir()
    (out / "checkpoint-20" / "trainer_state.json").write_text('{"global_st')  # torn by a kill
    (out / "checkpoint-30").mkdir()  # killed before the state was written
    (out / ".job").mkdir()
    (out / ".job" / "run.json").write_text(json.dumps({"fingerprint": FP}))
    state = observe_output(out)
    assert state.checkpoints == (10,)
    assert state.incomplete_checkpoints == (20, 30)
    assert state.run == {"fingerprint": FP} and state.marker is None
    assert decide_train(FP, INPUTS, state, False).checkpoint == 10


def test_observe_missing_output(tmp_path: Path):
    state = observe_output(tmp_path / "absent")
    assert not state.exists and state.empty


ZERO3_16 = {"world_size": 16, "deepspeed": "ds_z3.json"}


@pytest.mark.parametrize(
    ("previous", "current", "refused"),
    [
        (None, ZERO3_16, False),  # a run.json from before layouts were recorded
        (ZERO3_16, ZERO3_16, False),
        ({"world_size": 16, "deepspeed": None}, {"world_size": 8, "deepspeed": None}, False),  # DDP: whole tensors
        (ZERO3_16, {"world_size": 8, "deepspeed": "ds_z3.json"}, True),
        (ZERO3_16, {"world_size": 16, "deepspeed": "ds_z2.json"}, True),
        ({"world_size": 16, "deepspeed": None}, ZERO3_16, True),
    ],
    ids=["unknown", "same", "ddp-other-size", "zero3-other-size", "other-stage", "deepspeed-added"],
)
def test_deepspeed_checkpoints_resume_only_into_the_layout_that_wrote_them(previous, current, refused):
    problem = checkpoint_layout_problem(previous, current)
    assert (problem is not None) == refused
    if refused:
        assert "NNODES, GPUs per pod and DEEPSPEED it started with" in problem and "16 processes" in problem
