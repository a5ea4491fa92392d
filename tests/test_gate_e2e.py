"""End to end: the publish gate between the merge and the switch, on the tiny model trained by the real
entrypoint. A good adapter publishes with the gate's report; an all-zero lora_B, a NaN and a removed chat
template are each refused with exit 78 and a one-line reason naming the check, and the version served before
stays served. `python -m entrypoint verify DIR` runs the same checks alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, Storage, run_entrypoint

from entrypoint.errors import ExitCode

pytestmark = pytest.mark.e2e

LEARN = {"MAX_STEPS": "60", "SAVE_STEPS": "30", "LOGGING_STEPS": "10"}  # enough to learn to answer and stop
STRICT = {"PUBLISH_GATE": "strict"}
REGISTERED = "gate-demo"


@pytest.fixture(scope="module")
def published_root(tmp_path_factory, tiny_model, mlflow_server) -> Path:
    """A trained adapter (tracked in MLflow) merged and published once through the strict gate."""
    from entrypoint.tinymodel import write_demo_data

    root = tmp_path_factory.mktemp("gate") / "storage"
    write_demo_data(root / "data")
    (root / "models").mkdir(parents=True)
    storage = Storage(root, tiny_model)
    env = storage.env(TRACKING="mlflow", MLFLOW_TRACKING_URI=mlflow_server.uri, MLFLOW_EXPERIMENT_NAME="gate",
                      REGISTERED_MODEL_NAME=REGISTERED, IMAGE="registry.example/llama-factory-train:test",
                      **LEARN, **STRICT)
    for command in ("train", "merge"):
        result = run_entrypoint(command, env, timeout=900)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
    return root


@pytest.fixture
def published(tmp_path, published_root, tiny_model) -> Storage:
    root = tmp_path / "storage"
    shutil.copytree(published_root, root, symlinks=True)
    return Storage(root, tiny_model)


def served(storage: Storage) -> str:
    return os.readlink(storage.root / "models" / "merged-model")


def test_a_good_adapter_publishes_with_the_gates_report(published: Storage, mlflow_server):
    version = (published.root / "models" / "merged-model").resolve()
    report = json.loads((version / "gate.json").read_text())
    assert report["passed"] and report["mode"] == "strict"
    assert {c["name"]: c["status"] for c in report["checks"]} == {
        "finite": "pass", "adapter_effect": "pass", "tokenizer": "pass", "probe": "pass", "stops": "pass"}
    probe = next(c for c in report["checks"] if c["name"] == "probe")["data"]["prompts"]
    assert probe and all(p["first_difference"] is None and p["stopped_at"] is not None for p in probe)
    assert all(p["compared"] == min(16, p["tokens"]) > 0 for p in probe), "each prompt's tokens were compared"
    manifest = json.loads((version / ".merge.json").read_text())
    assert manifest["gate"] == {"mode": "strict", "passed": True, "failed": []}

    marker = json.loads((published.output / ".job" / "COMPLETE.json").read_text())
    run = mlflow_server.client().get_run(marker["mlflow_run_id"])
    assert run.data.metrics["gate_passed"] == 1.0 and run.data.tags["gate_result"] == "passed"
    artifacts = [a.path for a in mlflow_server.client().list_artifacts(marker["mlflow_run_id"])]
    assert {"gate.json", "lineage.json", "README.md"} <= set(artifacts)


def test_a_published_version_carries_its_lineage_and_model_card(published: Storage, mlflow_server):
    from entrypoint.tinymodel import DEMO_RECORDS

    version = (published.root / "models" / "merged-model").resolve()
    lineage = json.loads((version / "lineage.json").read_text())
    marker = json.loads((published.output / ".job" / "COMPLETE.json").read_text())
    assert lineage["version"] == version.name[:5] and lineage["base_model"]["path"] == str(published.base)
    assert lineage["base_model"]["identity"] == marker["inputs"]["model"]
    assert lineage["adapter"]["config"]["r"] == json.loads((published.output / "adapter_config.json").read_text())["r"]
    stats = lineage["dataset"]["statistics"]
    assert stats["records"] == len(DEMO_RECORDS) and stats["tokens"] > stats["records"]
    assert stats["share_truncated"] == round(stats["longer_than_cutoff"] / stats["measured"], 4)
    assert lineage["dataset"]["names"] == ["train_data"] and lineage["dataset"]["identity"]
    assert lineage["training"]["settings"] == marker["inputs"]["args"]
    assert lineage["mlflow"] == {"run_id": marker["mlflow_run_id"], "experiment": "gate",
                                 "tracking_uri": mlflow_server.uri}
    assert lineage["image"] == "registry.example/llama-factory-train:test"
    assert lineage["gate"]["passed"] and [c["name"] for c in lineage["gate"]["checks"]] == [
        "finite", "adapter_effect", "tokenizer", "probe", "stops"]
    card = (version / "README.md").read_text()
    assert f"{len(DEMO_RECORDS)} records" in card and marker["mlflow_run_id"] in card and "probe: pass" in card

    client = mlflow_server.client()
    inputs = client.get_run(marker["mlflow_run_id"]).inputs.dataset_inputs
    (dataset,) = [d.dataset for d in inputs]
    assert dataset.name == "train_data" and json.loads(dataset.profile)["records"] == len(DEMO_RECORDS)
    assert lineage["dataset"]["identity"].startswith(dataset.digest)

    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    candidate = client.get_model_version_by_alias(REGISTERED, "candidate")
    assert champion.version == candidate.version and champion.tags["storage_path"].endswith(version.name)


def _rewrite_adapter(storage: Storage, change) -> None:
    """Change the trained adapter's weights in place (a new adapter to the merge: its identity changes)."""
    from safetensors.torch import load_file, save_file

    path = storage.output / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _refused(storage: Storage, check: str) -> str:
    before = served(storage)
    result = run_entrypoint("merge", storage.env(**STRICT), timeout=600)
    assert result.returncode == ExitCode.CONFIG, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert f"publish gate: check {check} failed" in last and f"still serves {Path(before).name}" in last, last
    assert served(storage) == before, "the served version stays"
    versions = storage.root / "models" / "merged-model.versions"
    assert [p.name for p in versions.iterdir() if p.is_dir()] == [Path(before).name], "no new version"
    (refusal,) = versions.glob("refused-*.gate.json")
    report = json.loads(refusal.read_text())
    assert not report["passed"] and check in [c["name"] for c in report["checks"] if c["status"] == "fail"]
    return last


def test_an_adapter_whose_lora_b_is_all_zeros_is_refused(published: Storage):
    def zero_b(tensors):
        for name in tensors:
            if "lora_B" in name:
                tensors[name].zero_()

    _rewrite_adapter(published, zero_b)
    assert "equal the base's" in _refused(published, "adapter_effect")


def test_an_adapter_with_a_nan_is_refused(published: Storage):
    def one_nan(tensors):
        name = next(n for n in sorted(tensors) if "lora_A" in n)
        tensors[name][0, 0] = float("nan")

    _rewrite_adapter(published, one_nan)
    assert "NaN or infinity" in _refused(published, "finite")


def test_a_tokenizer_without_its_chat_template_is_refused(published: Storage):
    for name in ("chat_template.jinja", "chat_template.json"):
        (published.output / name).unlink(missing_ok=True)
    config_path = published.output / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    assert "no chat template" in _refused(published, "tokenizer")


def test_warn_publishes_what_strict_refuses_and_records_why(published: Storage):
    def zero_b(tensors):
        for name in tensors:
            if "lora_B" in name:
                tensors[name].zero_()

    _rewrite_adapter(published, zero_b)
    result = run_entrypoint("merge", published.env(PUBLISH_GATE="warn"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "publish gate: check adapter_effect failed" in result.stderr and "PUBLISH_GATE=warn" in result.stderr
    version = (published.root / "models" / "merged-model").resolve()
    assert version.name.startswith("v0002-")
    gate = json.loads((version / ".merge.json").read_text())["gate"]
    assert gate == {"mode": "warn", "passed": False, "failed": ["adapter_effect"]}, "the probe is not run after it"
    assert "adapter_effect: fail" in (version / "README.md").read_text()


def test_verify_checks_a_published_version_alone(published: Storage, tmp_path: Path):
    version = (published.root / "models" / "merged-model").resolve()
    good = run_entrypoint_verify(published, version)
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads(good.stdout)["passed"] is True

    broken = shutil.copytree(version, tmp_path / "broken")
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("inf")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    bad = run_entrypoint_verify(published, broken)
    assert bad.returncode == ExitCode.CONFIG
    assert "publish gate: check finite failed" in bad.stderr.strip().splitlines()[-1]
    assert name in bad.stdout


def test_a_merge_that_is_not_base_plus_adapter_fails_the_probe(published: Storage, tmp_path: Path):
    """Weights that differ from the base (adapter_effect passes) but are not base + adapter: the teacher-forced
    comparison with PEFT's PeftModel names the first token that differs."""
    import torch
    from safetensors.torch import load_file, save_file

    version = (published.root / "models" / "merged-model").resolve()
    wrong = shutil.copytree(version, tmp_path / "wrong")
    tensors = load_file(wrong / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if name.endswith("proj.weight"):
            tensor += torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.dtype) * 0.5
    save_file(tensors, wrong / "model.safetensors", metadata={"format": "pt"})
    result = run_entrypoint_verify(published, wrong)
    assert result.returncode == ExitCode.CONFIG, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "publish gate: check probe failed: prompt 1: the merged model's greedy token" in last, last
    assert "is not base+adapter's" in last
    report = json.loads(result.stdout)
    assert {c["name"]: c["status"] for c in report["checks"]}["adapter_effect"] == "pass"


def test_the_eval_loss_bar_against_the_base_model_and_a_number(published: Storage):
    """EVAL_DATASET gives the probe prompts and the records scored; the trained adapter's loss on its answers
    is below the untrained base's, and above an impossible bound."""
    version = (published.root / "models" / "merged-model").resolve()
    against_base = run_entrypoint_verify(published, version, EVAL_DATASET="train_data",
                                         PUBLISH_GATE_MAX_EVAL_LOSS="base")
    assert against_base.returncode == 0, against_base.stderr[-2000:]
    check = next(c for c in json.loads(against_base.stdout)["checks"] if c["name"] == "eval_loss")
    assert check["status"] == "pass" and check["data"]["records"] > 0
    assert 0 < check["data"]["loss"] < check["data"]["base_loss"]

    impossible = run_entrypoint_verify(published, version, EVAL_DATASET="train_data",
                                       PUBLISH_GATE_MAX_EVAL_LOSS="0.000001")
    assert impossible.returncode == ExitCode.CONFIG
    assert "publish gate: check eval_loss failed: loss" in impossible.stderr.strip().splitlines()[-1]


def test_a_merge_with_the_loss_bar_records_it_on_the_training_run(published: Storage, mlflow_server):
    """The bar in the Job: the merge publishes, and the run that trained the adapter gets the losses."""
    _rewrite_adapter(published, lambda tensors: [t.mul_(1.01) for n, t in tensors.items() if "lora_B" in n])
    env = published.env(**STRICT, TRACKING="mlflow", MLFLOW_TRACKING_URI=mlflow_server.uri, EVAL_DATASET="train_data",
                        PUBLISH_GATE_MAX_EVAL_LOSS="base")
    result = run_entrypoint("merge", env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    version = (published.root / "models" / "merged-model").resolve()
    assert version.name.startswith("v0002-")
    report = json.loads((version / "gate.json").read_text())
    check = next(c for c in report["checks"] if c["name"] == "eval_loss")
    assert check["status"] == "pass"
    marker = json.loads((published.output / ".job" / "COMPLETE.json").read_text())
    metrics = mlflow_server.client().get_run(marker["mlflow_run_id"]).data.metrics
    assert metrics["gate_eval_loss"] == pytest.approx(check["data"]["loss"])
    assert metrics["gate_base_eval_loss"] == pytest.approx(check["data"]["base_loss"])


def test_eval_dataset_errors_are_configuration_errors(published: Storage):
    version = (published.root / "models" / "merged-model").resolve()
    missing = run_entrypoint_verify(published, version, EVAL_DATASET="held_out")
    assert missing.returncode == ExitCode.CONFIG
    assert "EVAL_DATASET='held_out'" in missing.stderr.strip().splitlines()[-1]
    unbound = run_entrypoint_verify(published, version, PUBLISH_GATE_MAX_EVAL_LOSS="base")
    assert unbound.returncode == ExitCode.CONFIG
    assert "PUBLISH_GATE_MAX_EVAL_LOSS='base' needs EVAL_DATASET" in unbound.stderr
    bad = run_entrypoint_verify(published, version, EVAL_DATASET="train_data", PUBLISH_GATE_MAX_EVAL_LOSS="low")
    assert bad.returncode == ExitCode.CONFIG
    assert "expected a number > 0, base (not worse than the base model), or empty" in bad.stderr


def test_the_stop_check_within_its_token_and_time_bounds(tiny_model: Path):
    """The untrained base does not stop within 8 tokens: under PUBLISH_GATE_PROBE_TOKENS=8 that fails; when the
    time budget runs out first (here after the one step every prompt gets), the stop is reported not verified
    (skipped), never passed; a prompt longer than CUTOFF_LEN is not probed at all."""
    from entrypoint.gate_probe import Example, ModelRun, model_checks

    prompts = (Example([{"role": "user", "content": "What is the capital of France?"}]),)

    def stops(tokens: int, seconds: float, cutoff_len: int = 512):
        run = ModelRun(prompts, (), "", tokens, seconds, cutoff_len)
        checks = {c.name: c for c in model_checks(tiny_model, tiny_model, None, "float32", run)}
        assert checks["probe"].status == "skipped", "a full model: nothing to compare with"
        return checks["stops"]

    bounded = stops(8, 300)
    assert bounded.status == "fail" and "no stop token" in bounded.detail and "PUBLISH_GATE_PROBE_TOKENS=8" in \
        bounded.detail
    cut = stops(100000, 0.001)
    assert cut.status == "skipped"
    assert "PUBLISH_GATE_PROBE_SECONDS=0.001 (or the model's positions) ran out" in cut.detail
    assert cut.data["not_verified"] == [1] and 0 < cut.data["seconds"] < 30
    too_long = stops(8, 300, cutoff_len=4)  # a prompt longer than training ever saw is not probed
    assert too_long.status == "skipped"
    assert "is longer than 4 tokens (CUTOFF_LEN, or the model's positions)" in too_long.detail


MIB = 1024**2


def in_a_container_of(tmp_path: Path, monkeypatch, limit: int, used: int) -> None:
    """This process as the kernel of a container with a memory limit would show it (cgroup v2): the merge runs
    in this process, so the figures it reads are these."""
    from entrypoint import headroom

    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    (root / "memory.max").write_text(f"{limit}\n")
    (root / "memory.current").write_text(f"{used}\n")
    (root / "memory.stat").write_text(f"anon {used}\nactive_file 0\ninactive_file 0\n")
    (tmp_path / "self-cgroup").write_text("0::/\n")  # a cgroup namespace of its own, as Kubernetes gives
    monkeypatch.setattr(headroom, "CGROUP", root)
    monkeypatch.setattr(headroom, "SELF_CGROUP", tmp_path / "self-cgroup")


def test_a_probe_that_cannot_fit_the_containers_memory_is_refused_before_merging(
    published: Storage, tmp_path: Path, monkeypatch
):
    """A model small enough for PUBLISH_GATE_PROBE_MAX_GIB in a Job whose memory limit cannot hold it: the probe
    would get the Job killed after the whole merge, and its retry would merge again. Under strict that is a
    configuration error before the first byte; the figures and both ways out are named."""
    from entrypoint import merge
    from entrypoint.errors import ConfigError
    from entrypoint.settings import load_settings

    _rewrite_adapter(published, lambda tensors: [t.mul_(1.01) for n, t in tensors.items() if "lora_B" in n])
    in_a_container_of(tmp_path, monkeypatch, limit=700 * MIB, used=400 * MIB)
    before = served(published)
    with pytest.raises(ConfigError) as refused:
        merge.run(load_settings(published.env(**STRICT)))
    message = str(refused.value)
    assert message.startswith("PUBLISH_GATE=strict: the model-running checks need about ") and \
        message.endswith("Nothing was merged"), message
    assert "this container has 300.00 MiB left under the container's memory limit of 700.00 MiB (cgroup v2 " \
        "memory.max; 400.00 MiB in use)" in message and "raise the merge Job's memory limit by" in message
    from entrypoint.safetensors_stream import read_header

    weights = sum(read_header(p, "base").data_bytes for p in published.base.glob("*.safetensors"))
    assert f"or set PUBLISH_GATE_PROBE_MAX_GIB below {weights / 1024**3:.3g} to skip them" in message
    versions = published.root / "models" / "merged-model.versions"
    assert [p.name for p in versions.iterdir() if p.is_dir()] == [Path(before).name], "no work directory was made"
    assert served(published) == before


def test_a_merge_that_cannot_fit_the_containers_memory_is_refused_before_it_starts(
    published: Storage, tmp_path: Path, monkeypatch
):
    """The streaming merge's own buffers (two copies of its largest targeted tensor and its float32 update)
    against what the limit leaves: with the gate off, still refused before the first byte, naming the tensor."""
    from entrypoint import merge
    from entrypoint.errors import ConfigError
    from entrypoint.lora_merge import prepare_merge, working_bytes
    from entrypoint.safetensors_stream import read_header
    from entrypoint.settings import load_settings

    _rewrite_adapter(published, lambda tensors: [t.mul_(1.01) for n, t in tensors.items() if "lora_B" in n])
    prepared = prepare_merge(published.base, published.output)
    need, largest = working_bytes(prepared)
    sizes = {entry.name: entry.nbytes for path in published.base.glob("*.safetensors")
             for entry in read_header(path, "base").entries}
    assert largest == max(prepared.plan.updates, key=sizes.__getitem__)
    assert need >= 3 * sizes[largest], "two copies of the (float32) tensor and its float32 update"
    in_a_container_of(tmp_path, monkeypatch, limit=400 * MIB + need - 1, used=400 * MIB)
    before = served(published)
    with pytest.raises(ConfigError) as refused:
        merge.run(load_settings(published.env(PUBLISH_GATE="off")))
    message = str(refused.value)
    assert message.startswith("the merge needs about ") and f"its largest targeted tensor {largest}" in message
    assert "raise the merge Job's memory limit by 1 bytes or more. Nothing was merged" in message
    versions = published.root / "models" / "merged-model.versions"
    assert [p.name for p in versions.iterdir() if p.is_dir()] == [Path(before).name], "no work directory was made"

    in_a_container_of(tmp_path / "roomier", monkeypatch, limit=400 * MIB + need, used=400 * MIB)
    assert merge.run(load_settings(published.env(PUBLISH_GATE="off"))) == 0, "the same merge with room for it"


def test_under_warn_the_model_checks_that_cannot_fit_are_skipped_and_say_why(
    published: Storage, tmp_path: Path, monkeypatch
):
    from entrypoint import merge
    from entrypoint.settings import load_settings

    _rewrite_adapter(published, lambda tensors: [t.mul_(1.01) for n, t in tensors.items() if "lora_B" in n])
    in_a_container_of(tmp_path, monkeypatch, limit=700 * MIB, used=400 * MIB)
    assert merge.run(load_settings(published.env(PUBLISH_GATE="warn"))) == 0
    version = (published.root / "models" / "merged-model").resolve()
    assert version.name.startswith("v0002-")
    checks = {c["name"]: c for c in json.loads((version / "gate.json").read_text())["checks"]}
    assert {name: c["status"] for name, c in checks.items()} == {
        "finite": "pass", "adapter_effect": "pass", "tokenizer": "pass", "probe": "skipped", "stops": "skipped"}
    assert "memory limit of 700.00 MiB" in checks["probe"]["detail"] and \
        checks["probe"]["detail"].endswith(": not loaded")


def run_entrypoint_verify(storage: Storage, directory: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrypoint", "verify", str(directory)],
                          env=storage.env(**STRICT, **env), cwd=REPO, capture_output=True, text=True, timeout=600)


def run_command(storage: Storage, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrypoint", *args], env=storage.env(**STRICT, **env), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_rollback_serves_the_previous_version_moves_champion_and_a_remerge_does_not_undo_it(
        published: Storage, mlflow_server):
    registry = {"TRACKING": "mlflow", "MLFLOW_TRACKING_URI": mlflow_server.uri, "MLFLOW_EXPERIMENT_NAME": "gate",
                "REGISTERED_MODEL_NAME": "rollback-demo"}
    client = mlflow_server.client()
    first = served(published)
    versions, champions = [], []
    for scale in (1.05, 1.1):  # two more adapters that still work: the trained one, its lora_B scaled a little
        _rewrite_adapter(published, lambda tensors, s=scale: [t.mul_(s) for n, t in tensors.items() if "lora_B" in n])
        result = run_command(published, "merge", MERGE_KEEP_VERSIONS="1", **registry)
        assert result.returncode == 0, result.stderr[-3000:]
        versions.append(served(published))
        champions.append(client.get_model_version_by_alias("rollback-demo", "champion").version)
    second, third = versions
    kept = sorted(p.name for p in (published.root / "models" / "merged-model.versions").iterdir() if p.is_dir())
    assert kept == [Path(second).name, Path(third).name] and first not in kept, \
        "MERGE_KEEP_VERSIONS=1 keeps the served version and the rollback target"

    back = run_command(published, "rollback", **registry)
    assert back.returncode == 0, back.stderr[-3000:]
    assert served(published) == second and "rolled back" in back.stderr.strip().splitlines()[-1]
    assert client.get_model_version_by_alias("rollback-demo", "champion").version == champions[0]

    again = run_command(published, "merge", MERGE_KEEP_VERSIONS="1", **registry)
    assert again.returncode == 0, again.stderr[-3000:]
    assert served(published) == second, "a merge of the rolled-back adapter does not undo the rollback"
    assert "rolled back" in again.stderr and "rollback --to v0003" in again.stderr
    assert (published.root / "models" / third).is_dir(), "the version rolled back from is kept"

    forward = run_command(published, "rollback", "--to", "v0003", **registry)
    assert forward.returncode == 0, forward.stderr[-3000:]
    assert served(published) == third
    assert client.get_model_version_by_alias("rollback-demo", "champion").version == champions[1]
    assert "already serves this adapter" in run_command(published, "merge", **registry).stderr, \
        "rolled forward: the same adapter is served, nothing to do"


def test_rollback_to_a_version_that_does_not_exist_changes_nothing(published: Storage):
    before = served(published)
    missing = run_command(published, "rollback", "--to", "v0042")
    assert missing.returncode == ExitCode.CONFIG
    assert "no such version" in missing.stderr.strip().splitlines()[-1] and served(published) == before
    nothing_older = run_command(published, "rollback")
    assert nothing_older.returncode == ExitCode.CONFIG and "no version older than" in nothing_older.stderr
    assert served(published) == before
