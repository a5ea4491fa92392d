"""End to end: train -> merge -> the published model answers what it was trained to answer; atomic
publishing under kill -9; versions and retention; bad input leaves the published model untouched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import HEAVY_MODULES, REPO, Storage, run_entrypoint, snapshot

from entrypoint.errors import ExitCode
from entrypoint.tinymodel import DEMO_ANSWER, DEMO_PROMPT, generate_answer, make_tiny_model

pytestmark = pytest.mark.e2e

LEARN = {"MAX_STEPS": "60", "SAVE_STEPS": "30", "LOGGING_STEPS": "10"}  # enough to learn the demo answer
QUICK = {"MAX_STEPS": "2", "SAVE_STEPS": "2"}


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory, tiny_model, mlflow_server) -> Path:
    """A storage with the tiny model's adapter trained once per session (tracked in MLflow)."""
    from entrypoint.tinymodel import write_demo_data

    root = tmp_path_factory.mktemp("trained") / "storage"
    write_demo_data(root / "data")
    (root / "models").mkdir(parents=True)
    storage = Storage(root, tiny_model)
    env = storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=mlflow_server.uri, MLFLOW_EXPERIMENT_NAME="merge",
                      **LEARN)
    result = run_entrypoint("train", env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="session")
def merged_root(tmp_path_factory, trained_root, tiny_model) -> Path:
    """The trained storage with its first merge published, once per session."""
    root = tmp_path_factory.mktemp("merged") / "storage"
    shutil.copytree(trained_root, root, symlinks=True)
    result = run_entrypoint("merge", Storage(root, tiny_model).env())
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture
def trained(tmp_path, trained_root, tiny_model) -> Storage:
    root = tmp_path / "storage"
    shutil.copytree(trained_root, root, symlinks=True)
    return Storage(root, tiny_model)


@pytest.fixture
def merged(tmp_path, merged_root, tiny_model) -> Storage:
    root = tmp_path / "storage"
    shutil.copytree(merged_root, root, symlinks=True)
    return Storage(root, tiny_model)


def merged_path(storage: Storage) -> Path:
    return storage.root / "models" / "merged-model"


def published_state(storage: Storage) -> dict:
    """What a reader of MERGED_MODEL_PATH can see: the link and every file of every version."""
    path = merged_path(storage)
    return {"link": os.readlink(path) if path.is_symlink() else None,
            "files": snapshot(storage.root / "models")}


def test_merged_model_answers_like_training_and_rerun_skips(trained: Storage, mlflow_server):
    env = trained.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=mlflow_server.uri, REGISTERED_MODEL_NAME="tiny-demo")
    result = run_entrypoint("merge", env)
    assert result.returncode == 0, result.stderr[-3000:]
    path = merged_path(trained)
    assert path.is_symlink() and not os.path.isabs(os.readlink(path)), "readers need a relative link"
    version = path.resolve()
    assert version.parent.name == "merged-model.versions" and version.name.startswith("v0001-")
    assert generate_answer(path, DEMO_PROMPT) == DEMO_ANSWER

    base_weights = (trained.base / "model.safetensors").stat().st_size
    assert (version / "model.safetensors").stat().st_size == base_weights, "dtype or size changed"
    assert (version / "config.json").read_bytes() == (trained.base / "config.json").read_bytes()
    # The tokenizer training saved beside the adapter (what llamafactory-cli export publishes too), and a
    # generation config that stops where the llama3 template does.
    for name in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (version / name).read_bytes() == (trained.output / name).read_bytes(), name
    assert json.loads((version / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert json.loads((version / "generation_config.json").read_text())["eos_token_id"] == json.loads(
        (trained.base / "generation_config.json").read_text())["eos_token_id"]
    assert not (version / "adapter_model.safetensors").exists() and not (version / "trainer_log.jsonl").exists()

    marker = json.loads((trained.output / ".job" / "COMPLETE.json").read_text())
    run = mlflow_server.client().get_run(marker["mlflow_run_id"])
    assert run.data.tags["merged_model_version"] == version.name
    assert run.data.metrics["merged_model_bytes"] > 0 and run.data.metrics["merge_peak_rss_mib"] > 0
    versions = mlflow_server.client().search_model_versions("name='tiny-demo'")
    assert len(versions) == 1 and versions[0].tags["storage_path"] == str(version)

    probe = subprocess.run(
        [sys.executable, "-c", "import runpy, sys, json\nsys.argv = ['entrypoint', 'merge']\ntry:\n"
         "    runpy.run_module('entrypoint', run_name='__main__')\nexcept SystemExit as exc:\n    code = exc.code\n"
         f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY_MODULES!r} if m in sys.modules]}}))\n"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {"code": 0, "heavy": []}, probe.stderr
    assert "already serves this adapter" in probe.stderr


def test_a_merge_whose_gate_does_not_run_the_model_loads_torch_alone(trained: Storage):
    """The Job's memory is the merge's: the dataset statistics come from training's marker, and the gate's
    streamed checks need no transformers; LLaMA-Factory, transformers and PEFT load only for the probe."""
    from entrypoint.tinymodel import DEMO_RECORDS

    marker = json.loads((trained.output / ".job" / "COMPLETE.json").read_text())
    assert marker["data_statistics"]["records"] == len(DEMO_RECORDS), "measured when training completed"
    env = trained.env(PUBLISH_GATE="strict", PUBLISH_GATE_PROBE_MAX_GIB="0")
    probe = subprocess.run(
        [sys.executable, "-c", "import runpy, sys, json\nsys.argv = ['entrypoint', 'merge']\ntry:\n"
         "    runpy.run_module('entrypoint', run_name='__main__')\nexcept SystemExit as exc:\n    code = exc.code\n"
         f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY_MODULES!r} if m in sys.modules]}}))\n"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {"code": 0, "heavy": ["torch"]}, probe.stderr
    version = merged_path(trained).resolve()
    gate = {c["name"]: c["status"] for c in json.loads((version / "gate.json").read_text())["checks"]}
    assert gate == {"finite": "pass", "adapter_effect": "pass", "tokenizer": "pass", "probe": "skipped",
                    "stops": "skipped"}
    lineage = json.loads((version / "lineage.json").read_text())
    assert lineage["dataset"]["statistics"] == marker["data_statistics"]


def test_each_new_training_publishes_a_version_and_old_ones_are_pruned(merged: Storage):
    trained = merged
    first = merged_path(trained).resolve()
    for seed in ("7", "8"):
        retrain = run_entrypoint("train", trained.env(REPLACE_OUTPUT="true", SEED=seed, **QUICK))
        assert retrain.returncode == 0, retrain.stderr[-2000:]
        merged = run_entrypoint("merge", trained.env(MERGE_KEEP_VERSIONS="2"))
        assert merged.returncode == 0, merged.stderr[-2000:]
    versions = sorted(p.name[:5] for p in (trained.root / "models" / "merged-model.versions").iterdir())
    assert versions == ["v0002", "v0003"], "keep 2: the current one and the previous one"
    assert not first.exists()
    assert merged_path(trained).resolve().name.startswith("v0003-")


def test_a_plain_directory_from_the_older_layout_is_migrated_not_deleted(trained: Storage):
    legacy = merged_path(trained)
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text('{"model_type": "llama", "note": "written in place by the original design"}')
    result = run_entrypoint("merge", trained.env())
    assert result.returncode == 0, result.stderr[-2000:]
    kept = list((trained.root / "models" / "merged-model.versions").glob("v0000-legacy-*"))
    assert len(kept) == 1 and "written in place" in (kept[0] / "config.json").read_text()
    assert merged_path(trained).is_symlink() and merged_path(trained).resolve().name.startswith("v0001-")


def test_kill_9_mid_merge_leaves_the_old_model_served_and_the_rerun_completes(tmp_path: Path):
    from entrypoint.tinymodel import write_demo_data

    root = tmp_path / "storage"
    base = make_tiny_model(root / "models" / "base-model", layers=8, hidden=512, max_shard_size="20MB")
    write_demo_data(root / "data")
    storage = Storage(root, base)
    env = storage.env(CUTOFF_LEN="32", **QUICK)
    assert run_entrypoint("train", env).returncode == 0
    assert run_entrypoint("merge", env).returncode == 0
    served = published_state(storage)
    assert len(list(base.glob("*.safetensors"))) >= 4, "the kill needs a merge of several shards"

    assert run_entrypoint("train", storage.env(CUTOFF_LEN="32", REPLACE_OUTPUT="true", SEED="3", **QUICK)) \
        .returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "entrypoint", "merge"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    versions = root / "models" / "merged-model.versions"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.suffix == ".safetensors" for w in versions.glob(".tmp-*") for p in w.iterdir()):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the merge finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert published_state(storage)["link"] == served["link"]
    visible = {k: v for k, v in snapshot(root / "models").items() if ".tmp-" not in k and ".lock" not in k}
    assert visible == served["files"], "the served version changed under a killed merge"

    rerun = run_entrypoint("merge", env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "removed unfinished work of an interrupted merge" in rerun.stderr
    assert not list(versions.glob(".tmp-*"))
    assert merged_path(storage).resolve().name.startswith("v0002-")


def _other_base(storage: Storage) -> dict[str, str]:
    other = make_tiny_model(storage.root / "models" / "other-base", hidden=32)
    return {"BASE_MODEL_PATH": str(other)}


def _truncated_base(storage: Storage) -> dict[str, str]:
    copy = storage.root / "models" / "truncated-base"
    shutil.copytree(storage.base, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"BASE_MODEL_PATH": str(copy)}


def _quantized_base(storage: Storage) -> dict[str, str]:
    copy = storage.root / "models" / "quantized-base"
    shutil.copytree(storage.base, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (copy / "config.json").write_text(json.dumps(config))
    return {"BASE_MODEL_PATH": str(copy)}


def _outside_link(storage: Storage) -> dict[str, str]:
    elsewhere = storage.root.parent / "somewhere-else"
    elsewhere.mkdir()
    merged_path(storage).unlink()  # someone re-pointed the served path by hand
    merged_path(storage).symlink_to(elsewhere)
    return {}


def _retrained_base(storage: Storage) -> dict[str, str]:
    """The base's weights replaced after training (same shapes, other values): the adapter no longer fits."""
    changed = Path(shutil.copytree(storage.base, storage.root / "models" / "changed-base"))
    make_tiny_model(storage.root / "models" / "new-weights", seed=5)
    shutil.copy(storage.root / "models" / "new-weights" / "model.safetensors", changed / "model.safetensors")
    return {"BASE_MODEL_PATH": str(changed)}


def _no_marker(storage: Storage) -> dict[str, str]:
    shutil.rmtree(storage.output / ".job")  # an adapter copied in from elsewhere
    return {}


def _no_adapter(storage: Storage) -> dict[str, str]:
    shutil.rmtree(storage.output)
    return {}


def _unfinished_adapter(storage: Storage) -> dict[str, str]:
    (storage.output / ".job" / "COMPLETE.json").unlink()
    return {"ADAPTER_WAIT_SECONDS": "1"}


BAD = [
    ("missing-adapter", _no_adapter, ExitCode.CONFIG, "does not exist. Train first"),
    ("unfinished-adapter-after-wait", _unfinished_adapter, ExitCode.TEMPORARY,
     "has no completion marker: its training started but has not finished, after waiting 1s"),
    ("adapter-without-marker", _no_marker, ExitCode.CONFIG,
     "has no completion marker of this tool (an adapter trained elsewhere?); to merge it as it is, set "
     "MERGE_UNMARKED_ADAPTER=true"),
    ("adapter-for-another-base", _other_base, ExitCode.CONFIG, "is not the base the adapter was trained on"),
    ("base-weights-changed-since-training", _retrained_base, ExitCode.CONFIG,
     "is not the base the adapter was trained on: model.safetensors differs from the files recorded at training"),
    ("truncated-shard", _truncated_base, ExitCode.CONFIG, "model.safetensors"),
    ("quantized-base", _quantized_base, ExitCode.CONFIG, "config.json differs from the files recorded at training"),
    ("symlink-outside-storage", _outside_link, ExitCode.CONFIG, "not published by this tool"),
]


@pytest.mark.parametrize(("name", "setup", "code", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_merge_input_leaves_the_published_model_untouched(merged: Storage, name, setup, code, expected):
    trained = merged
    overrides = setup(trained)
    before = published_state(trained)
    result = run_entrypoint("merge", trained.env(**overrides))
    assert result.returncode == code, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr[-2000:]
    assert published_state(trained) == before
    assert not list((trained.root / "models" / "merged-model.versions").glob(".tmp-*"))


def test_no_space_is_refused_before_writing(trained: Storage, tmp_path: Path):
    small = tmp_path / "small-fs"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        target = small / "merged-model"
        result = run_entrypoint("merge", trained.env(MERGED_MODEL_PATH=str(target)))
        assert result.returncode == ExitCode.CONFIG
        assert "not enough free space" in result.stderr
        assert not target.exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_an_unmarked_adapter_merges_when_asked(merged: Storage):
    shutil.rmtree(merged.output / ".job")
    result = run_entrypoint("merge", merged.env(MERGE_UNMARKED_ADAPTER="true"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "without a completion marker (MERGE_UNMARKED_ADAPTER=true)" in result.stderr
    assert merged_path(merged).resolve().name.startswith("v0002-")
    assert generate_answer(merged_path(merged), DEMO_PROMPT) == DEMO_ANSWER


def test_an_adapter_changed_in_place_publishes_anew(merged: Storage):
    """Same size, same configuration, other values (an adapter copied over the old one): a new version."""
    from safetensors.torch import load_file, save_file

    weights = merged.output / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({name: tensor * 0.5 for name, tensor in tensors.items()}, weights, metadata={"format": "pt"})
    before = merged_path(merged).resolve().name
    result = run_entrypoint("merge", merged.env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert before.startswith("v0001-") and merged_path(merged).resolve().name.startswith("v0002-")


def test_vllm_lora_prints_how_to_serve_the_adapter(trained: Storage):
    result = run_entrypoint("vllm-lora", trained.env(SERVED_MODEL_NAME="tiny-lora"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--enable-lora" in result.stdout and "--max-lora-rank 16" in result.stdout
    assert f"tiny-lora={trained.output}" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"lora_name": "tiny-lora",
                                                                  "lora_path": str(trained.output)}


def test_full_fine_tuning_output_is_published_as_is(storage: Storage):
    env = storage.env(FINETUNING_TYPE="full", LEARNING_RATE="1e-3", **QUICK)
    trained = run_entrypoint("train", env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = run_entrypoint("merge", env)
    assert result.returncode == 0, result.stderr[-2000:]
    published = merged_path(storage).resolve()
    assert (published / "model.safetensors").read_bytes() == (storage.output / "model.safetensors").read_bytes()
    assert (published / "model.safetensors").read_bytes() != (storage.base / "model.safetensors").read_bytes()
    assert "0 tensors merged" in result.stderr


def test_a_waiting_merge_stops_when_training_failed_for_good(storage: Storage):
    """The merge Job starts with training and waits for its marker; a training that no retry can fix (exit 78)
    ends that wait within seconds instead of ADAPTER_WAIT_SECONDS, and a fixed training clears the record."""
    storage.output.parent.mkdir(parents=True)
    failed = run_entrypoint("train", storage.env(TEMPLATE="llama4000", JOB_NAME="llama-train-x"))
    assert failed.returncode == ExitCode.CONFIG and not storage.output.exists()

    started = time.monotonic()
    merge = run_entrypoint("merge", storage.env(ADAPTER_WAIT_SECONDS="600"))
    assert merge.returncode == ExitCode.CONFIG, merge.stderr[-2000:]
    assert time.monotonic() - started < 60
    assert "failed for good (exit 78, Job llama-train-x: TEMPLATE='llama4000' is not a LLaMA-Factory" in merge.stderr
    assert not merged_path(storage).exists()

    fixed = run_entrypoint("train", storage.env(**QUICK))
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    merge = run_entrypoint("merge", storage.env(ADAPTER_WAIT_SECONDS="600"))
    assert merge.returncode == 0, merge.stderr[-2000:]
