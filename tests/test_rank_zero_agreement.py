"""worker.follow_rank_zero over a real gloo process group: every rank trains with global rank 0's arguments,
even when another node's launcher saw the storage differently (here: an older checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, base_env, free_port

PROBE = (
    "import json, sys\n"
    "from entrypoint.cli import setup_logging\n"
    "from entrypoint.worker import follow_rank_zero\n"
    "setup_logging('INFO')\n"
    "spec = json.loads(sys.argv[1])\n"
    "print(json.dumps(follow_rank_zero(spec)))\n"
    # As worker.main does: leave the group before exiting, or gloo's threads can abort the interpreter.
    "from entrypoint.worker import leave_process_group\n"
    "leave_process_group()\n"
)


def _spec(checkpoint: int, run_id: str | None) -> dict:
    return {"lf_args": {"resume_from_checkpoint": f"/out/checkpoint-{checkpoint}", "ddp_timeout": 30},
            "mlflow_run_id": run_id, "result_path": f"/tmp/result-{checkpoint}.json", "checkpoint_on_stop": True}


def test_every_rank_takes_rank_zeros_arguments_and_a_lagging_node_says_so():
    port = free_port()
    specs = [_spec(20, "run-1"), _spec(10, None)]  # rank 1's node missed checkpoint-20 and knows no MLflow run
    procs = []
    for rank, spec in enumerate(specs):
        env = {**base_env(), "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE, json.dumps(spec)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    agreed = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for rank, spec in enumerate(agreed):
        assert spec["lf_args"] == specs[0]["lf_args"] and spec["mlflow_run_id"] == "run-1"
        assert spec["result_path"] == specs[rank]["result_path"], "each node keeps its own result file"
    assert "decided differently from node 0 on resume_from_checkpoint; following node 0" in outputs[1][1]
    assert "decided differently" not in outputs[0][1]
