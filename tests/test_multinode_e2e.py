"""End to end across two "nodes": two launchers (`python -m entrypoint train`, NODE_RANK 0 and 1) on 127.0.0.1,
one shared storage, real torchrun rendezvous, real gloo process group, real LLaMA-Factory on the tiny model,
a real MLflow server. Only the network is local: in a cluster each launcher is a pod of the Indexed Job."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from helpers import Storage, free_port, run_entrypoint, snapshot, start_entrypoint, wait_for_steps

from entrypoint.decisions import observe_output
from entrypoint.errors import ExitCode
from entrypoint.storage import write_checkpoint_record

pytestmark = pytest.mark.e2e

STEPS = 40
SAVE_STEPS = 5


def _node_env(storage: Storage, mlflow_uri: str, rank: int, port: int) -> dict[str, str]:
    return storage.env(
        TRACKING="mlflow", MLFLOW_TRACKING_URI=mlflow_uri, MLFLOW_EXPERIMENT_NAME="e2e-multinode",
        NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="1",
        # A rank that vanished without closing its sockets would stall the other this long: the kill below
        # must be noticed well before it.
        DDP_TIMEOUT="90",
        # Two samples per rank and step, so each rank sees a different half of the data.
        BATCH_SIZE="2", MAX_STEPS=str(STEPS), SAVE_STEPS=str(SAVE_STEPS), LOGGING_STEPS="1",
        TERMINATION_LOG_PATH=str(storage.root / f"termination-log-{rank}"),
        JOB_NAME="llama-train-e2e", POD_NAME=f"llama-train-e2e-{rank}",
        # Two busy processes share this machine's cores: threads within each would only contend.
        OMP_NUM_THREADS="1",
    )


@contextmanager
def _nodes(storage: Storage, mlflow_uri: str, logs: Path, name: str) -> Iterator[list[subprocess.Popen]]:
    """Both nodes' launchers, started together; whatever they left running is killed afterwards."""
    port = free_port()
    procs = [start_entrypoint("train", _node_env(storage, mlflow_uri, rank, port), logs / f"{name}-{rank}.log")
             for rank in (0, 1)]
    try:
        yield procs
    finally:
        for proc in procs:
            for child in _descendants(proc.pid):
                child.kill()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _log(logs: Path, name: str, rank: int) -> str:
    return (logs / f"{name}-{rank}.log").read_text()


def test_two_nodes_train_one_output_and_a_killed_rank_fails_both_then_both_resume(
    storage: Storage, mlflow_server, tmp_path: Path
):
    client = mlflow_server.client()

    # Attempt 1: both nodes train together until one rank is killed (an OOM kill, a crashed process).
    with _nodes(storage, mlflow_server.uri, tmp_path, "first") as (node0, node1):
        wait_for_steps(storage.output, SAVE_STEPS + 3, node0, node1)
        (torchrun,) = [p for p in _descendants(node1.pid) if "torch.distributed.run" in p.cmdline()]
        (rank1,) = torchrun.children()
        rank1.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        codes = [node0.wait(timeout=120), node1.wait(timeout=120)]
        stopped_after = time.monotonic() - t0
    assert codes == [ExitCode.INTERNAL, ExitCode.INTERNAL], (
        "both nodes must fail the attempt with the retriable code:\n"
        + _log(tmp_path, "first", 0)[-3000:] + _log(tmp_path, "first", 1)[-3000:])
    assert stopped_after < 60, f"node 0 took {stopped_after:.0f}s to notice the lost rank (DDP_TIMEOUT is 90)"
    assert storage.marker() is None, "a failed attempt must never look complete"
    state = observe_output(storage.output)
    assert state.checkpoints, "no complete checkpoint to resume from"
    latest = state.checkpoints[-1]
    reached = max(json.loads(line)["current_steps"] for line in (storage.output / "trainer_log.jsonl").open())
    assert reached < STEPS, "training finished before the rank was killed"
    run_id = json.loads((storage.output / ".job" / "run.json").read_text())["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FAILED"
    assert not (storage.output.parent / f".{storage.output.name}.lock").exists(), "node 0 kept the lock"

    # Attempt 2 (the Job's retry): both resume from the latest complete checkpoint and finish.
    with _nodes(storage, mlflow_server.uri, tmp_path, "second") as (node0, node1):
        codes = [node0.wait(timeout=300), node1.wait(timeout=300)]
    logs = [_log(tmp_path, "second", rank) for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert f"resuming from checkpoint-{latest}" in logs[0]
    assert f"node 1 of 2: interrupted run: resuming from checkpoint-{latest}" in logs[1]
    # Rank 1 trained (as the second of two ranks) up to the last step, and left success to node 0's marker.
    assert f"node 1 of 2: trained as rank 1 of 2 to step {STEPS}" in logs[1]

    marker = storage.marker()
    assert marker is not None and marker["mlflow_run_id"] == run_id
    assert (storage.output / "adapter_model.safetensors").stat().st_size > 0
    assert sorted(p.name for p in storage.output.parent.iterdir()) == [".tokenized", storage.output.name], (
        "one output and its tokenized dataset: nothing moved aside, no second output, no lock left")
    assert len(list((storage.output.parent / ".tokenized").iterdir())) == 1, "node 0 alone tokenized"
    state = json.loads((storage.output / "trainer_state.json").read_text())
    # 8 records, 2 per rank and step: with two ranks an epoch takes 2 steps (with one it would take 4).
    assert state["global_step"] == STEPS and state["epoch"] == STEPS / 2

    # One MLflow run for both nodes and both attempts, written by global rank 0 only.
    experiment = client.get_experiment_by_name("e2e-multinode")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["attempt"] == "2" and run.data.params["NNODES"] == "2"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert min(steps) <= latest < max(steps) == STEPS
    second_only = [step for step in steps if step > reached]  # steps only the second attempt trained
    assert sorted(second_only) == list(range(reached + 1, STEPS + 1)), "one rank alone feeds MLflow"

    # A third start of both nodes (a re-applied Job) skips on each node, and writes nothing.
    with _nodes(storage, mlflow_server.uri, tmp_path, "third") as (node0, node1):
        codes = [node0.wait(timeout=120), node1.wait(timeout=120)]
    assert codes == [0, 0]
    assert all("skipped" in _log(tmp_path, "third", rank) for rank in (0, 1))


def test_a_node_other_than_zero_refuses_alike_and_never_writes_the_storage(storage: Storage, tmp_path: Path):
    """Node 1 decides from the same storage as node 0 but acts on it only through node 0: it refuses the same
    foreign output with the same code, and with REPLACE_OUTPUT it moves nothing aside, takes no lock, writes no
    run.json; without a node 0 it gives up waiting for node 0's tokenized dataset (DDP_TIMEOUT) with the retriable
    code."""
    storage.output.mkdir(parents=True)
    (storage.output / "notes.txt").write_text("someone else's files")
    shared = storage.output.parent  # the output, its lock and anything moved aside beside it
    before = snapshot(shared)
    env = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1"}

    refused = [run_entrypoint("train", storage.env(**env, NODE_RANK=str(rank))) for rank in (0, 1)]
    assert [r.returncode for r in refused] == [ExitCode.CONFIG, ExitCode.CONFIG]
    assert all("files this tool did not write" in r.stderr for r in refused)
    # Node 0 alone records the refusal beside the output (a merge waiting for it stops waiting); the
    # output itself and everything else are as they were.
    after = snapshot(shared)
    assert set(after) - set(before) == {f".{storage.output.name}.failed.json"}
    assert {k: v for k, v in after.items() if k in before} == before
    before = after

    t0 = time.monotonic()
    alone = run_entrypoint("train", storage.env(**env, NODE_RANK="1", REPLACE_OUTPUT="true", DDP_TIMEOUT="10"))
    assert alone.returncode == ExitCode.TEMPORARY, alone.stderr[-3000:]
    assert "node 1 of 2: output holds files this tool did not write: moving it aside" in alone.stderr
    assert "node 0 did not publish the tokenized dataset" in alone.stderr
    assert time.monotonic() - t0 < 120
    assert snapshot(shared) == before, "node 1 wrote to the storage"


def test_one_pod_with_two_processes_trains_through_torchrun(storage: Storage, tmp_path: Path):
    """NNODES=1 with several GPUs (prod's 8 x H100): one pod, a local rendezvous, one output."""
    result = run_entrypoint("train", storage.env(NPROC_PER_NODE="2", BATCH_SIZE="2", MAX_STEPS="10",
                                                 OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 processes" in result.stderr
    assert storage.marker() is not None
    state = json.loads((storage.output / "trainer_state.json").read_text())
    assert state["global_step"] == 10 and state["epoch"] == 5, "both processes took their share of the data"


def test_a_deepspeed_run_is_not_resumed_with_another_layout(storage: Storage):
    """An output interrupted while 16 processes trained it with ZeRO-3 (as two 8-GPU pods leave it) is not
    resumed by one process: DeepSpeed's per-process checkpoint would fail to load on every retry."""
    env = storage.env()
    check = run_entrypoint("check", env)
    assert check.returncode == 0, check.stderr[-2000:]
    fingerprint = json.loads(check.stdout)["fingerprint"]
    (storage.output / "checkpoint-5").mkdir(parents=True)
    (storage.output / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    (storage.output / ".job").mkdir()
    (storage.output / ".job" / "run.json").write_text(json.dumps({
        "fingerprint": fingerprint, "attempt": 1, "mlflow_run_id": None,
        "layout": {"world_size": 16, "deepspeed": "ds_z3.json"}}))
    write_checkpoint_record(storage.output / "checkpoint-5")  # complete, as the interrupted run left it
    before = snapshot(storage.output.parent)

    result = run_entrypoint("train", env)
    assert result.returncode == ExitCode.CONFIG, result.stderr[-3000:]
    assert "written by 16 processes with DeepSpeed (ds_z3.json) and this run has 1 process with no DeepSpeed" \
        in result.stderr
    after = snapshot(storage.output.parent)  # the output as it was; beside it, the refusal for a waiting merge
    assert set(after) - set(before) == {f".{storage.output.name}.failed.json"}
    assert {k: v for k, v in after.items() if k in before} == before
