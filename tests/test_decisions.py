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
from entrypoint.storage import checkpoint_problem, write_checkpoint_record

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
        (OutputState(exists=True, empty=False, run={"fingerprint": "x"}), False, Action.START, None, False, True),
        (OutputState(exists=True, empty=False, is_file=True), True, Action.REFUSE, None, False, False),
        (OutputState(exists=True, empty=False, run={"fingerprint": "x"}, checkpoints=(10,)), True,
         Action.START, None, True, False),
        (OutputState(exists=True, empty=False), False, Action.REFUSE, None, False, False),
        (OutputState(exists=True, empty=False), True, Action.START, None, True, False),
    ],
    ids=["nothing", "empty-dir", "complete-same", "complete-other", "complete-other-replace", "resume-latest",
         "resume-skips-torn-checkpoint", "partial-no-checkpoint", "partial-other", "failed-start-of-other-config",
         "output-is-a-file", "partial-other-replace", "foreign-files", "foreign-files-replace"],
)
def test_decide_train(state, replace, action, checkpoint, replace_first, fresh):
    decision = decide_train(FP, INPUTS, state, replace)
    assert decision.action is action
    assert decision.checkpoint == checkpoint
    assert decision.replace_first is replace_first
    assert decision.fresh_dir is fresh
    if action is Action.REFUSE:
        assert "nothing was changed" in decision.reason
        assert ("REPLACE_OUTPUT=true" in decision.reason) is not state.is_file


def test_refusal_names_what_changed():
    state = OutputState(exists=True, empty=False, marker={"fingerprint": "x", "inputs": OTHER})
    decision = decide_train(FP, INPUTS, state, replace=False)
    assert decision.changed == ("lora_rank", "dataset")
    assert "changed: lora_rank, dataset" in decision.reason
    assert changed_keys(None, INPUTS) == ()


def test_observe_output_tells_complete_from_torn_checkpoints(tmp_path: Path):
    out = tmp_path / "out"
    for step in (10, 20, 30):
        checkpoint = out / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_model.safetensors").write_bytes(b"w" * 100)
        (checkpoint / "optimizer.pt").write_bytes(b"o" * 200)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if step != 30:  # checkpoint-30: killed before its record was written
            write_checkpoint_record(checkpoint)
    (out / "checkpoint-20" / "optimizer.pt").write_bytes(b"o" * 50)  # torn after the fact: trainer_state intact
    (out / ".job").mkdir()
    (out / ".job" / "run.json").write_text(json.dumps({"fingerprint": FP}))
    state = observe_output(out)
    assert state.checkpoints == (10,)
    assert state.incomplete_checkpoints == (20, 30)
    assert state.run == {"fingerprint": FP} and state.marker is None
    decision = decide_train(FP, INPUTS, state, False)
    assert decision.checkpoint == 10
    assert "resuming from checkpoint-10 (checkpoint-20, checkpoint-30 incomplete, skipped)" in decision.reason
    assert checkpoint_problem(out / "checkpoint-20") == "optimizer.pt has 50 bytes, 200 were written"


def test_an_output_with_only_our_state_directory_counts_as_empty(tmp_path: Path):
    (tmp_path / "out" / ".job" / "dataset_info").mkdir(parents=True)
    assert observe_output(tmp_path / "out").empty


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
