"""Tokenize once: time from the start of `python -m entrypoint train` to its training loop and to its first
step, on a dataset large enough for tokenization to matter on CPU, printed as a table.

1. First run: reads and tokenizes the records, publishes the tokenized dataset, trains; stopped by SIGTERM
   once it has trained past a checkpoint.
2. Resume with the tokenized dataset (what every retry, resume and other node does) and resume without it
   (the cache deleted first: what every restart cost before), alternated, --runs times each.

Each attempt gets a fresh HF_HOME, as a new pod does (the Hugging Face datasets cache lives in the pod).
Target: the median resume with the cache reaches its training loop in at most 0.75x the time without it.
(The first step adds the same step time to both; on a busy machine it varies by seconds.)

    python benchmarks/tokenize_bench.py [--records 20000] [--runs 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from entrypoint.demo import storage_env  # noqa: E402  (the demo's settings, with more steps)
from entrypoint.tinymodel import DEMO_RECORDS, make_tiny_model  # noqa: E402

SAVE_STEPS = 5
LOOP = "***** Running training *****"  # transformers, as its training loop starts


def write_records(data: Path, count: int) -> None:
    """`count` distinct Alpaca records (the demo's, numbered)."""
    data.mkdir(parents=True, exist_ok=True)
    records = [{**DEMO_RECORDS[i % len(DEMO_RECORDS)],
                "instruction": f"{DEMO_RECORDS[i % len(DEMO_RECORDS)]['instruction']} ({i})"} for i in range(count)]
    (data / "train_data.json").write_text(json.dumps(records), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"train_data": {"file_name": "train_data.json"}}))


def steps_logged(output: Path) -> int:
    log = output / "trainer_log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def attempt(env: dict[str, str], work: Path, name: str) -> tuple[float, float]:
    """(seconds to the training loop, seconds to the first training step) of one attempt, stopped by SIGTERM
    once it has trained past a checkpoint."""
    output = Path(env["LORA_OUTPUT_PATH"])
    home = work / "hf-home" / name
    shutil.rmtree(home, ignore_errors=True)
    before = steps_logged(output)
    log_path = work / f"{name}.log"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "entrypoint", "train"], env={**env, "HF_HOME": str(home)},
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        loop = first = None
        while proc.poll() is None:
            if loop is None and LOOP in log_path.read_text(errors="replace"):
                loop = time.perf_counter() - t0
            logged = steps_logged(output) - before
            if first is None and logged >= 1:
                first = time.perf_counter() - t0
            if logged >= SAVE_STEPS + 2:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        code = proc.wait(timeout=300)
    if loop is None or first is None or code != 143:
        raise SystemExit(f"{name}: exit {code}, loop {loop}, first step {first}; see {log_path}")
    return loop, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000, help="records in the dataset (default 20000)")
    parser.add_argument("--runs", type=int, default=2, help="resumes of each kind (default 2)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="tokenize-bench-"))
    make_tiny_model(work / "models" / "base-model")
    write_records(work / "data", args.records)
    env = {**os.environ, **storage_env(work, 100000), "TRACKING": "none", "LOG_LEVEL": "WARNING",
           "LOGGING_STEPS": "1", "SAVE_STEPS": str(SAVE_STEPS)}
    shutil.rmtree(work / "output", ignore_errors=True)

    first = attempt(env, work, "first")
    cached, uncached = [], []
    for i in range(args.runs):
        cached.append(attempt(env, work, f"resume-cached-{i}"))
        shutil.rmtree(work / "output" / ".tokenized")
        uncached.append(attempt(env, work, f"resume-uncached-{i}"))

    def median(results: list[tuple[float, float]], index: int) -> float:
        return statistics.median(r[index] for r in results)

    ratio = median(cached, 0) / median(uncached, 0)
    print(f"\n{args.records} records, the demo's tiny model and settings (CUTOFF_LEN 128, batch 8), CPU; "
          f"resumes: medians of {args.runs}\n")
    print("| attempt | start -> training loop | start -> first step |")
    print("|---|---:|---:|")
    for name, results in (("first run (tokenizes, publishes)", [first]),
                          ("resume with the tokenized dataset", cached),
                          ("resume without it (tokenizes again)", uncached)):
        print(f"| {name} | {median(results, 0):.1f} s | {median(results, 1):.1f} s |")
    met = ratio <= 0.75
    print(f"\nresume with / without the cache, to the training loop: {ratio:.2f}x (target <= 0.75x): "
          f"{'met' if met else 'MISSED'}")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
