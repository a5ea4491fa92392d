"""Training entrypoint benchmark: whole-process figures on the tiny model, printed as a table.

1. Skip path: `python -m entrypoint train` on a complete output (target: median < 0.5 s).
2. Overhead: the entrypoint's training against plain `llamafactory-cli train` with the same arguments on
   the same tiny run (target: <= 1.10x), alternating runs, medians compared.

    python benchmarks/train_bench.py [--runs 3] [--skip-runs 15] [--steps 60] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from entrypoint.demo import storage_env  # noqa: E402  (the demo's settings are the benchmark's run)


def timed(command: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="training runs per method (default 3)")
    parser.add_argument("--skip-runs", type=int, default=15, help="skip-path runs (default 15)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="train-bench-"))
    from entrypoint.demo import prepare

    prepare(work)
    env = {**os.environ, **storage_env(work, args.steps), "TRACKING": "none", "LOG_LEVEL": "WARNING"}
    entry = [sys.executable, "-m", "entrypoint", "train"]
    cli = str(Path(sys.executable).parent / "llamafactory-cli")

    # The exact LLaMA-Factory arguments the entrypoint uses, for llamafactory-cli.
    check = subprocess.run([sys.executable, "-m", "entrypoint", "check"], env=env, cwd=REPO,
                           capture_output=True, text=True, check=True)
    lf_args = json.loads(check.stdout)["llamafactory_args"]
    lf_args.pop("precision")  # fp32 on CPU: the entrypoint sets no bf16/fp16 flag either
    plain_out = work / "output" / "plain-cli"
    lf_args["output_dir"] = str(plain_out)
    lf_args["overwrite_output_dir"] = True
    yaml_path = work / "plain.yaml"
    yaml_path.write_text(json.dumps(lf_args))  # JSON is YAML

    out = Path(env["LORA_OUTPUT_PATH"])
    ours, plain = [], []
    for i in range(args.runs):
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(plain_out, ignore_errors=True)
        order = [("ours", entry), ("plain", [cli, "train", str(yaml_path)])]
        for name, command in (order if i % 2 == 0 else order[::-1]):
            (ours if name == "ours" else plain).append(timed(command, env))
    skip = [timed(entry, env) for _ in range(args.skip_runs)]

    median_ours, median_plain = statistics.median(ours), statistics.median(plain)
    ratio = median_ours / median_plain
    skip_median = statistics.median(skip)
    rows = [
        ("skip path (complete output)", f"{skip_median:.3f} s median, {max(skip):.3f} s max "
         f"({len(skip)} runs)", "< 0.5 s", skip_median < 0.5),
        (f"entrypoint train ({args.steps} steps)", f"{median_ours:.2f} s median of {len(ours)}",
         "", None),
        (f"llamafactory-cli train ({args.steps} steps)", f"{median_plain:.2f} s median of {len(plain)}",
         "", None),
        ("overhead (entrypoint / plain)", f"{ratio:.3f}x", "<= 1.10x", ratio <= 1.10),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}} | {'result':<36} | target   | ok")
    print(f"{'-' * width}-+-{'-' * 36}-+----------+----")
    for name, value, target, ok in rows:
        mark = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:<{width}} | {value:<36} | {target:<8} | {mark}")
    print(f"\nraw: ours={[round(x, 2) for x in ours]} plain={[round(x, 2) for x in plain]}")


if __name__ == "__main__":
    main()
