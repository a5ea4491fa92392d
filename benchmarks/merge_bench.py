"""Benchmark the merge Job's command against PEFT and `llamafactory-cli export` on a local model.

    python benchmarks/merge_bench.py [--params 400M] [--workdir DIR] [--shards 5] [--rank 16] [--repeat 3] [--gate]

Builds (once per workdir) a random bf16 Llama of about --params parameters in --shards safetensors
shards, a small tokenizer and a rank-16 LoRA adapter on all linear layers with random B, then runs
each method in its own process and prints peak RSS, wall time, output size and dtype:
- `python -m entrypoint merge` as the merge Job runs it (inputs, lock, merge, checks, atomic publish),
- the streaming merge function alone, PEFT's merge_and_unload + save_pretrained, llamafactory-cli export,
- `cp -r` + `sync`, the I/O floor.
Every method runs --repeat times, round by round, and the table shows the median wall time (and the range);
before each run the inputs are read once, so every method finds them in the page cache and none is timed
against a disk the method before it filled.
With --gate, only the Job's command, without and with the publish gate (PUBLISH_GATE=off; warn with the
model-running checks skipped, PUBLISH_GATE_PROBE_MAX_GIB=0; then warn with
the demo data as EVAL_DATASET and PUBLISH_GATE_MAX_EVAL_LOSS=base: the random model never stops, so the stop
check fails, but every check runs, the generation and the loss bar included), and their ratio of peak RSS
and wall time. Exits 1 when a target is missed. For the command: peak RSS <= 0.30x
PEFT's, wall <= 0.5x PEFT's and <= 3x the floor's, output dtype and size equal the base's.

Peak RSS is the child's ru_maxrss from wait4(). Linux carries the parent's RSS high-water mark into a
child started by vfork+exec, so this process stays small: it never imports torch, and the model is
built in a child of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from entrypoint.safetensors_stream import read_header  # noqa: E402  (torch-free)

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 1024, 2816, 16, 32000
RSS_TARGET = 0.30
WALL_TARGET = 0.5
FLOOR_TARGET = 3.0


def parse_params(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def layers_for(params: int) -> int:
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    return max(1, round((params - 2 * VOCAB * HIDDEN) / per_layer))


def build(workdir: Path, params: int, shards: int, rank: int) -> None:
    """Child process: write workdir/base (model + tokenizer) and workdir/adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, num_hidden_layers=layers_for(params), max_position_embeddings=2048,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    base = workdir / "base"
    model.save_pretrained(base, max_shard_size=int(total / shards * 1.02) + 1, safe_serialization=True)

    # A small BPE tokenizer: `llamafactory-cli export` needs one beside the model.
    words = [f"token{i} word{i % 97} piece{i % 13}" for i in range(2000)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(words, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    # A chat template, so the gate's probe renders its prompts as vLLM would.
    fast.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
                          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    fast.save_pretrained(base)

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    peft_model.save_pretrained(workdir / "adapter")
    (workdir / "built.json").write_text(json.dumps({"params": params, "shards": shards, "rank": rank,
                                                    "chat_template": True}))


def run_ours(base: Path, adapter: Path, out: Path) -> None:
    from entrypoint.lora_merge import merge_adapter

    out.mkdir()
    merge_adapter(base, adapter, out, lambda p: print(f"  shard {p.shard_index}/{p.shard_count}", flush=True))


def run_peft(base: Path, adapter: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)


def warm(*directories: Path) -> None:
    """Read every input file once, so that each method finds them in the page cache: the methods before it
    (PEFT's and LLaMA-Factory's outputs, 9 GB at 1.5B) must not decide which one reads from the disk."""
    buffer = bytearray(8 << 20)
    for directory in directories:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                with open(path, "rb", buffering=0) as fh:
                    while fh.readinto(buffer):
                        pass


def measure(name: str, command: list[str], out: Path, extra_env: dict[str, str] | None = None,
            inputs: tuple[Path, ...] = ()) -> dict[str, object]:
    for stale in (out, out.with_name(out.name + ".versions")):
        if stale.is_symlink():
            stale.unlink()
        shutil.rmtree(stale, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1",
           **(extra_env or {})}
    # Each method starts with nothing dirty in the page cache: a `sync` inside one (the floor's) must not
    # flush what the method before it wrote.
    warm(*inputs)
    os.sync()
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert child.stderr is not None
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if child.returncode != 0:
        sys.exit(f"{name} failed ({child.returncode}):\n{stderr.decode(errors='replace')[-3000:]}")
    size, dtype = weights_of(out)
    return {"method": name, "rss_mb": usage.ru_maxrss / 1024, "wall_s": wall, "size_mb": size / 1e6,
            "dtype": dtype}


def median_row(measured: list[dict[str, object]]) -> dict[str, object]:
    """The run with the median wall time, its peak RSS the highest of all runs, and the range of walls."""
    ordered = sorted(measured, key=lambda row: float(row["wall_s"]))  # type: ignore[arg-type]
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["rss_mb"] = max(float(run["rss_mb"]) for run in measured)  # type: ignore[arg-type]
    row["walls"] = f"{float(ordered[0]['wall_s']):.1f}-{float(ordered[-1]['wall_s']):.1f}"  # type: ignore[arg-type]
    return row


def weights_of(directory: Path) -> tuple[int, str]:
    by_dtype: dict[str, int] = {}
    files = sorted(directory.glob("*.safetensors"))
    for path in files:
        for entry in read_header(path, "output").entries:
            by_dtype[entry.dtype] = by_dtype.get(entry.dtype, 0) + entry.nbytes
    dtypes = sorted(by_dtype, key=by_dtype.__getitem__, reverse=True)
    return sum(p.stat().st_size for p in files), "+".join(dtypes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="400M", help="model size, e.g. 400M or 1.5B")
    parser.add_argument("--workdir", type=Path, help="keeps the model between runs (default: a temp dir)")
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gate", action="store_true", help="measure the publish gate: merge without and with it")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every method; the table shows medians")
    parser.add_argument("--child", nargs=4, metavar=("ROLE", "A", "B", "C"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, *paths = args.child
        if role == "build":
            build(Path(paths[0]), int(paths[1]), args.shards, int(paths[2]))
        else:
            {"ours": run_ours, "peft": run_peft}[role](*map(Path, paths))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    params = parse_params(args.params)
    me = [sys.executable, str(Path(__file__).resolve())]
    wanted = {"params": params, "shards": args.shards, "rank": args.rank, "chat_template": True}
    built = workdir / "built.json"
    if not built.is_file() or json.loads(built.read_text()) != wanted:
        for stale in ("base", "adapter"):
            shutil.rmtree(workdir / stale, ignore_errors=True)
        print(f"building a {args.params} bf16 Llama, rank-{args.rank} adapter in {workdir} ...", flush=True)
        subprocess.run([*me, "--shards", str(args.shards), "--child", "build", str(workdir), str(params),
                        str(args.rank)], check=True)
    base, adapter = workdir / "base", workdir / "adapter"
    base_size, base_dtype = weights_of(base)
    shard_count = len(list(base.glob("*.safetensors")))
    print(f"base: {base_size / 1e6:.0f} MB {base_dtype} in {shard_count} shards; adapter "
          f"{(adapter / 'adapter_model.safetensors').stat().st_size / 1e6:.1f} MB", flush=True)

    export_yaml = workdir / "export.yaml"
    export_yaml.write_text(
        f"model_name_or_path: {base}\nadapter_name_or_path: {adapter}\ntemplate: default\n"
        f"finetuning_type: lora\nexport_dir: {workdir / 'out-llamafactory'}\nexport_device: cpu\n"
        "export_size: 5\n"
    )
    cli = Path(sys.executable).with_name("llamafactory-cli")
    ours, peft, published = workdir / "out-ours", workdir / "out-peft", workdir / "merged-model"
    # The Job's environment: this adapter has no training marker of ours, nothing is tracked.
    job_env = {"BASE_MODEL_PATH": str(base), "LORA_OUTPUT_PATH": str(adapter), "MERGED_MODEL_PATH": str(published),
               "MERGE_UNMARKED_ADAPTER": "true", "TRACKING": "none", "LOG_LEVEL": "WARNING",
               "TERMINATION_LOG_PATH": str(workdir / "termination-log"), "PUBLISH_GATE": "off"}
    if args.gate:
        return gate_bench(workdir, job_env, published)
    runs = [
        ("python -m entrypoint merge (the Job)", [sys.executable, "-m", "entrypoint", "merge"], published, job_env),
        ("merge_adapter() alone", [*me, "--child", "ours", str(base), str(adapter), str(ours)], ours, None),
        ("PEFT merge_and_unload", [*me, "--child", "peft", str(base), str(adapter), str(peft)], peft, None),
        ("llamafactory-cli export", [str(cli), "export", str(export_yaml)], workdir / "out-llamafactory", None),
        ("cp -r + sync (I/O floor)", ["sh", "-c", f"cp -r '{base}' '{workdir / 'out-cp'}' && sync"],
         workdir / "out-cp", None),
    ]
    rounds: list[list[dict[str, object]]] = [[] for _ in runs]
    for turn in range(1, args.repeat + 1):
        # Round by round, so that a slow spell of the machine lands on every method, not on one; each round
        # starts one method later, so that no method always follows the same one (and the disk it left busy).
        for step in range(len(runs)):
            index = (turn - 1 + step) % len(runs)
            name, command, out, extra_env = runs[index]
            print(f"round {turn}/{args.repeat}: {name} ...", flush=True)
            rounds[index].append(measure(name, command, out, extra_env, inputs=(base, adapter)))
    results = [median_row(measured) for measured in rounds]

    job_row, peft_row, floor_row = results[0], results[2], results[-1]
    print()
    print(f"Median of {args.repeat} run(s) each; peak RSS is the highest of them.")
    print("| method | peak RSS (MiB) | wall (s) | wall range (s) | output size (MB) | output dtype | RSS/PEFT "
          "| wall/PEFT | wall/floor |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for row in results:
        rss_ratio, wall_ratio = row["rss_mb"] / peft_row["rss_mb"], row["wall_s"] / peft_row["wall_s"]
        print(f"| {row['method']} | {row['rss_mb']:.0f} | {row['wall_s']:.1f} | {row['walls']} "
              f"| {row['size_mb']:.0f} | {row['dtype']} | {rss_ratio:.2f} | {wall_ratio:.2f} "
              f"| {row['wall_s'] / floor_row['wall_s']:.1f} |")
    checks = {
        f"the Job's peak RSS <= {RSS_TARGET}x PEFT's": job_row["rss_mb"] <= RSS_TARGET * peft_row["rss_mb"],
        f"the Job's wall <= {WALL_TARGET}x PEFT's": job_row["wall_s"] <= WALL_TARGET * peft_row["wall_s"],
        f"the Job's wall <= {FLOOR_TARGET}x cp -r + sync": job_row["wall_s"] <= FLOOR_TARGET * floor_row["wall_s"],
        f"output dtype = base's ({base_dtype})": job_row["dtype"] == base_dtype,
        f"output size = base's ({base_size / 1e6:.0f} MB)": round(job_row["size_mb"] * 1e6) == base_size,
    }
    print()
    for check, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    if args.workdir is None:
        shutil.rmtree(workdir)
    return 0 if all(checks.values()) else 1


def gate_bench(workdir: Path, job_env: dict[str, str], published: Path) -> int:
    """The Job's command without the gate, then with it (probe prompts from the demo dataset)."""
    data = workdir / "data"
    if not (data / "dataset_info.json").is_file():
        subprocess.run([sys.executable, "-c", f"from pathlib import Path; from entrypoint.tinymodel import "
                        f"write_demo_data; write_demo_data(Path({str(data)!r}))"], cwd=REPO, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    command = [sys.executable, "-m", "entrypoint", "merge"]
    base = workdir / "base"
    inputs = (base, workdir / "adapter")
    alone = measure("merge (PUBLISH_GATE=off)", command, published, job_env, inputs)
    streamed = measure("merge + streamed checks (PUBLISH_GATE_PROBE_MAX_GIB=0)", command, published,
                       {**job_env, "PUBLISH_GATE": "warn", "PUBLISH_GATE_PROBE_MAX_GIB": "0"}, inputs)
    gated = measure("merge + gate (PUBLISH_GATE=warn)", command, published,
                    {**job_env, "PUBLISH_GATE": "warn", "DATASET_PATH": str(data), "LOG_LEVEL": "INFO",
                     "EVAL_DATASET": "train_data", "PUBLISH_GATE_MAX_EVAL_LOSS": "base"}, inputs)
    report = json.loads((published.resolve() / "gate.json").read_text())
    floor = measure("cp -r + sync (I/O floor)", ["sh", "-c", f"cp -r '{base}' '{workdir / 'out-cp'}' && sync"],
                    workdir / "out-cp", None, inputs)
    print()
    print("| method | peak RSS (MiB) | wall (s) | RSS / merge alone | wall / merge alone | wall / floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in (alone, streamed, gated, floor):
        print(f"| {row['method']} | {row['rss_mb']:.0f} | {row['wall_s']:.1f} | {row['rss_mb'] / alone['rss_mb']:.2f} "
              f"| {row['wall_s'] / alone['wall_s']:.2f} | {row['wall_s'] / floor['wall_s']:.1f} |")
    print()
    print(f"gate alone: {report['seconds']:.1f} s; checks: "
          + ", ".join(f"{c['name']} {c['status']}" for c in report["checks"]))
    ran = {c["name"]: c["status"] for c in report["checks"]}
    for check in report["checks"]:
        print(f"- {check['name']}: {check['status']}: {check['detail']}")
    return 0 if ran.get("probe") != "skipped" and ran.get("finite") == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
