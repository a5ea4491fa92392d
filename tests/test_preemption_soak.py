"""Preemption soak: a real training run (LLaMA-Factory, the tiny model, a real MLflow server) is stopped again
and again at random moments, each time started again as the Job controller would, and must end as if it had
never been stopped.

SIGTERM (what a Spot preemption, a drain or a deleted Job sends) five times: while the dataset is tokenized,
just after the start, while a checkpoint is saved, and at random steps. SIGKILL (an OOM kill, a lost node)
three times: while tokenizing, while saving and at a random step, with a short lock TTL. Then:

- one adapter and one completion marker; one tokenized dataset, published; no partial leftovers;
- the adapter equals the one an uninterrupted run trains;
- one MLflow run, whose loss points, in the order they were sent, rise step by step and go back only to the
  checkpoint a restart resumed from; the steps logged twice are the replayed ones, and every step is there;
- steps trained in all <= planned steps + restarts x SAVE_STEPS.

The moments are random: SOAK_SEED in the environment repeats a sequence, and every failure message names the
seed. Checkpoints are slowed down (tests/trainer_faults), as a large model's are on NFS, so that "during a
save" is a window a signal can hit.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
from helpers import REPO, Storage, run_entrypoint, start_entrypoint

from entrypoint.storage import CHECKPOINT_RECORD
from entrypoint.tinymodel import write_demo_data
from entrypoint.tokenized import CACHE_DIR, RECORD, WORK_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.soak]

MAX_STEPS = 60
SAVE_STEPS = 4
REPEAT = 500  # 4000 records: tokenizing them takes long enough to be interrupted
SLOW_CHECKPOINT = REPO / "tests" / "trainer_faults"
TOKENIZING = "Running tokenizer on dataset"  # LLaMA-Factory's progress bar over the records


def unrecorded_checkpoints(output: Path) -> set[str]:
    return {p.name for p in output.glob("checkpoint-*") if not (p / CHECKPOINT_RECORD).exists()}


def published(storage: Storage) -> list[Path]:
    return [p for p in (storage.root / "output" / CACHE_DIR).glob("*") if (p / RECORD).is_file()]


class Attempt:
    """One pod of the Job: the entrypoint started anew, stopped by `sig` once `moment` has come."""

    def __init__(self, storage: Storage, env: dict[str, str], log: Path) -> None:
        self.storage, self.log = storage, log
        self.torn_before = unrecorded_checkpoints(storage.output)
        self.started = time.monotonic()
        self.proc = start_entrypoint("train", env, log)

    def new_steps(self) -> int:
        """Steps this attempt trained (and logged): the Trainer prints each logging step's record."""
        return self.log.read_text(errors="replace").count("{'loss': ")

    def wait(self, moment: str, rng: random.Random) -> bool:
        """Block until the moment has come while the process runs; False when it ended first."""
        steps = rng.randint(1, 6)
        pause = rng.uniform(0.5, 3.0)
        deadline = time.monotonic() + 300
        while self.proc.poll() is None and time.monotonic() < deadline:
            if moment == "tokenizing" and TOKENIZING in self.log.read_text(errors="replace"):
                return True
            if moment == "start" and time.monotonic() - self.started >= pause:
                return True
            if moment == "step" and self.new_steps() >= steps:
                return True
            if moment == "saving" and unrecorded_checkpoints(self.storage.output) - self.torn_before:
                return True
            time.sleep(0.01)
        return False

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def resumed_from(self) -> int:
        found = re.search(r"resuming from checkpoint-(\d+)", self.log.read_text(errors="replace"))
        return int(found.group(1)) if found else 0


def segments(points: list[tuple[int, int]]) -> list[list[int]]:
    """Loss points (timestamp, step) in the order they were sent, cut wherever the step does not rise."""
    found: list[list[int]] = []
    for _, step in sorted(points):
        if not found or step <= found[-1][-1]:
            found.append([])
        found[-1].append(step)
    return found


def test_repeated_preemption_ends_with_one_complete_adapter_and_one_continuous_mlflow_run(
        storage: Storage, mlflow_server, tmp_path: Path):
    seed = int(os.environ.get("SOAK_SEED") or time.time_ns() % 100000)
    rng = random.Random(seed)
    write_demo_data(storage.data, repeat=REPEAT)
    experiment = f"soak-{seed}-{tmp_path.name}"
    env = storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=mlflow_server.uri, MLFLOW_EXPERIMENT_NAME=experiment,
                      MAX_STEPS=str(MAX_STEPS), SAVE_STEPS=str(SAVE_STEPS), LOGGING_STEPS="1",
                      LOCK_TTL_SECONDS="10", LOCK_WAIT_SECONDS="60", SLOW_CHECKPOINT_SECONDS="0.5",
                      PYTHONPATH=f"{SLOW_CHECKPOINT}:{REPO}")
    later = [(signal.SIGTERM, "start"), (signal.SIGTERM, "step"), (signal.SIGTERM, "step"),
             (signal.SIGTERM, "saving"), (signal.SIGKILL, "saving"), (signal.SIGKILL, "step")]
    rng.shuffle(later)
    plan = [(signal.SIGTERM, "tokenizing"), (signal.SIGKILL, "tokenizing"), *later]
    t0 = time.monotonic()
    resumes, report = [], []
    for number, (sig, moment) in enumerate(plan, start=1):
        attempt = Attempt(storage, env, tmp_path / f"attempt-{number}.log")
        where = f"seed {seed}, attempt {number} ({sig.name} {moment}); log: {attempt.log}"
        assert attempt.wait(moment, rng), f"the run ended before the moment came: {where}\n" + \
            attempt.log.read_text()[-3000:]
        code = attempt.stop(sig)
        # SIGTERM before the entrypoint has set its handler (while Python imports) ends it as the signal does.
        expected = {-signal.SIGKILL} if sig is signal.SIGKILL else {143}
        if moment == "start":
            expected.add(-signal.SIGTERM)
        assert code in expected, f"exit {code}: {where}\n" + attempt.log.read_text()[-3000:]
        if moment == "tokenizing":
            assert published(storage) == [], f"a tokenized dataset was published by an interrupted run: {where}"
        assert storage.marker() is None, f"an interrupted run looks complete: {where}"
        resumes.append(attempt.resumed_from())
        report.append((number, sig.name, moment, code, attempt.resumed_from(), attempt.new_steps()))

    final = Attempt(storage, env, tmp_path / "final.log")
    assert final.proc.wait(timeout=600) == 0, f"seed {seed}: " + final.log.read_text()[-3000:]
    resumes.append(final.resumed_from())
    report.append(("final", "-", "-", 0, final.resumed_from(), final.new_steps()))
    wall = time.monotonic() - t0
    restarts = len(plan)
    trained = sum(row[-1] for row in report)
    summary = "\n".join("attempt {}: {} {}, exit {}, resumed from step {}, trained {} steps".format(*row)
                        for row in report) + \
        f"\nseed {seed}: {restarts} restarts, {trained} steps trained for {MAX_STEPS}, {wall:.0f} s"
    print(summary)

    # One adapter, one marker, one published tokenized dataset, no leftovers.
    marker = storage.marker()
    assert marker is not None and marker["fingerprint"], summary
    assert sorted(p.name for p in (storage.root / "output").iterdir()) == [CACHE_DIR, "lora-adapter"], summary
    assert (storage.output / "adapter_model.safetensors").is_file(), summary
    assert len(published(storage)) == 1, summary
    assert not (storage.output / ".job" / WORK_DIR).exists(), "a partial tokenization was left behind"
    state = json.loads((storage.output / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS, summary

    # At most one checkpoint interval replayed per restart.
    assert MAX_STEPS <= trained <= MAX_STEPS + restarts * SAVE_STEPS, summary

    # One MLflow run, continuous across every attempt.
    client = mlflow_server.client()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [marker["mlflow_run_id"]], summary
    assert runs[0].info.status == "FINISHED", summary
    history = [(m.timestamp, m.step) for m in client.get_metric_history(marker["mlflow_run_id"], "loss")]
    parts = segments(history)
    assert len(parts) <= restarts + 1, f"{summary}\nloss steps: {parts}"
    seen: set[int] = set()
    replayed = 0
    for part in parts:
        if part[0] - 1 not in {0, *resumes}:
            raise AssertionError(f"{summary}\nloss points restart at {part[0]}, not after a checkpoint "
                                 f"resumed from ({sorted(set(resumes))}): {parts}")
        replayed += len(seen.intersection(part))
        seen.update(part)
    assert seen == set(range(1, MAX_STEPS + 1)), f"{summary}\nloss steps: {parts}"
    assert replayed <= restarts * SAVE_STEPS, f"{summary}\n{replayed} steps logged twice: {parts}"

    # The same adapter as a run that was never stopped (it reuses the published tokenized dataset).
    reference_output = storage.root / "output" / "reference"
    reference = run_entrypoint("train", {**env, "LORA_OUTPUT_PATH": str(reference_output), "TRACKING": "none",
                                         "SLOW_CHECKPOINT_SECONDS": ""}, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "tokenized dataset: reusing" in reference.stderr + reference.stdout
    assert_same_adapter(storage.output, reference_output)


def assert_same_adapter(ours: Path, reference: Path) -> None:
    import torch
    from safetensors.torch import load_file

    a = load_file(ours / "adapter_model.safetensors")
    b = load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, name=name: f"{name}: {m}")

