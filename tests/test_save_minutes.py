"""SAVE_MINUTES: the training callback checkpoints once that many minutes have passed since the last checkpoint,
whatever the step time, so a preemption loses at most that much training (components/spot sets it).

Run through a real transformers Trainer on a tiny torch model (CPU): the checkpoints that appear on disk are
the outcome. Time is a fake clock moved by a fixed amount per step, so a "slow step" costs no real time. The
agreement between ranks is checked with a real two-process gloo group: every rank must save at the same step.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import free_port
from transformers import Trainer, TrainerCallback, TrainingArguments

from entrypoint.tracking import NullTracker
from entrypoint.worker import JobCallback, StopFlag

STEPS = 10
SECONDS_PER_STEP = 25.0


class _Regression(torch.nn.Module):
    """The smallest model Trainer accepts: one weight, a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((self.weight * x - labels) ** 2).mean()}


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([1.0]), "labels": torch.tensor([2.0])}


class _Clock(TrainerCallback):
    """A step takes SECONDS_PER_STEP: the clock reads the step the trainer has reached."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def on_step_end(self, args, state, control, **kwargs):
        self.now = state.global_step * SECONDS_PER_STEP


def _checkpoints(tmp_path: Path, save_minutes: int, save_steps: int) -> list[int]:
    clock = _Clock()
    callback = JobCallback(StopFlag(), True, NullTracker(), save_minutes=save_minutes, clock=clock)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=STEPS, save_steps=save_steps,
                             per_device_train_batch_size=1, logging_steps=1000, report_to=[], use_cpu=True,
                             save_safetensors=False, disable_tqdm=True, seed=1)
    # The clock callback runs first: it moves time before the job callback looks at it.
    Trainer(model=_Regression(), args=args, train_dataset=_Data(), callbacks=[clock, callback]).train()
    return sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))


def test_a_checkpoint_every_save_minutes_of_training_whatever_the_step_count(tmp_path: Path) -> None:
    # 25 s per step, SAVE_MINUTES=1: due after 75 s (step 3), again 75 s after each save; the Trainer saves
    # the last step (10) itself.
    assert _checkpoints(tmp_path, save_minutes=1, save_steps=1000) == [3, 6, 9, 10]


def test_a_step_checkpoint_restarts_the_clock(tmp_path: Path) -> None:
    # SAVE_STEPS=4 saves at 4 and 8; time adds 3 (75 s from the start) and 7 (75 s after step 4).
    assert _checkpoints(tmp_path, save_minutes=1, save_steps=4) == [3, 4, 7, 8, 10]


def test_zero_keeps_step_checkpoints_only(tmp_path: Path) -> None:
    assert _checkpoints(tmp_path, save_minutes=0, save_steps=4) == [4, 8, 10]


def _rank(rank: int, port: int, results: dict) -> None:
    """One rank: only rank 0's clock says a checkpoint is due, only rank 1 got SIGTERM."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stop = StopFlag()
        stop.requested_at = 0.0 if rank == 1 else None
        now = [0.0]
        callback = JobCallback(stop, True, NullTracker(), save_minutes=1, clock=lambda: now[0])
        state = SimpleNamespace(global_step=7, is_world_process_zero=rank == 0)
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        callback.on_train_begin(None, state, control)
        now[0] = 61.0 if rank == 0 else 30.0
        callback.on_step_end(SimpleNamespace(device="cpu"), state, control)
        results[rank] = (control.should_save, control.should_training_stop)
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_saves_and_stops_at_the_same_step() -> None:
    """A checkpoint due on one rank, or SIGTERM on another, is acted on by all: a rank that saved alone would
    wait forever in the collective of a sharded (ZeRO-3) checkpoint."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        # Forked: the children reuse the torch this process has loaded (spawning would import it twice more).
        mp.start_processes(_rank, args=(free_port(), results), nprocs=2, join=True, start_method="fork")
        assert dict(results) == {0: (True, True), 1: (True, True)}


@pytest.mark.parametrize("raw", ["-1", "ten", "1.5"])
def test_a_bad_value_is_refused_naming_the_variable_and_what_is_allowed(raw: str) -> None:
    from entrypoint.errors import ConfigError
    from entrypoint.settings import load_settings

    with pytest.raises(ConfigError) as raised:
        load_settings({"SAVE_MINUTES": raw, "TRACKING": "none"})
    assert f"SAVE_MINUTES={raw!r} is not valid: expected an integer >= 0 and <= 10080" in str(raised.value)
