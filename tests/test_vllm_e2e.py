"""vLLM serves what we publish: the real CPU build of vLLM on a tiny model trained and merged by the real
entrypoint, started with the flags the README and `python -m entrypoint vllm-lora` give users.

The published merged model answers the trained prompt with the trained answer and stops; the adapter loaded
at runtime answers token for token like the merge; after a second training and merge a restarted vLLM
serves the new version and the second adapter loads next to the first. vLLM refusing a model, an adapter or
not getting ready in time fails with its own reason and leaves no process behind.

Each vLLM start takes a minute or more on two cores: the servers are shared by the module's tests, which
run in file order (the last one publishes a second version).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, Storage, run_entrypoint
from vllm_server import VLLM_PYTHON, running, vllm_env

from entrypoint.demo import DEMO_STEPS
from entrypoint.local_vllm import VllmError, VllmServer, engine_flags, group_members, merged_model_flags
from entrypoint.settings import default_configmap, load_settings
from entrypoint.tinymodel import DEMO_ANSWER, DEMO_PROMPT, DEMO_RECORDS
from entrypoint.vllm_lora import vllm_lora_instructions

pytestmark = pytest.mark.e2e

LEARN = {"MAX_STEPS": str(DEMO_STEPS), "SAVE_STEPS": "30", "LOGGING_STEPS": "10",  # the demo's: learns its answer
         "PUBLISH_GATE": "strict"}
NEW_ANSWER = "Byteburg is the capital of the demo kingdom now."
# Trained prompts (the answers are confident, so merge and adapter must agree on every greedy token).
PROMPTS = [r["instruction"] for r in DEMO_RECORDS if not r["input"]][:4]


def train_and_merge(storage: Storage, **overrides: str) -> dict[str, str]:
    env = storage.env(**LEARN, **overrides)
    for command in ("train", "merge"):
        result = run_entrypoint(command, env, timeout=900)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
    return env


def vllm_lora(env: dict[str, str], name: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """What `python -m entrypoint vllm-lora` tells users for this adapter: the server flags for runtime
    loading, the server's environment and the load request's body."""
    env = {**env, "SERVED_MODEL_NAME": name}
    result = run_entrypoint("vllm-lora", env)
    assert result.returncode == 0, result.stderr[-2000:]
    settings = load_settings(env)
    instructions = vllm_lora_instructions(Path(settings.lora_output_path), name)
    printed = result.stdout.strip().splitlines()
    assert printed[:-1] == instructions.text().splitlines(), "the command prints these instructions"
    # The runtime request names only --enable-lora; --max-lora-rank comes from the start-up flags (without it
    # vLLM's default of 16 would refuse adapters of a higher rank).
    flags = list(instructions.serve_args)
    rank = flags[flags.index("--max-lora-rank") + 1]
    return ["--enable-lora", "--max-lora-rank", rank], instructions.runtime_env, json.loads(printed[-1])


@pytest.fixture(scope="module")
def storage(tmp_path_factory, tiny_model) -> Storage:
    from entrypoint.tinymodel import write_demo_data

    root = tmp_path_factory.mktemp("vllm") / "storage"
    write_demo_data(root / "data")
    (root / "models").mkdir(parents=True)
    return Storage(root, tiny_model)


@pytest.fixture(scope="module")
def first(storage: Storage) -> dict[str, str]:
    """The demo's training, merged and published: its environment."""
    return train_and_merge(storage)


@pytest.fixture(scope="module")
def merged_server(storage: Storage, first: dict[str, str]) -> Iterator[VllmServer]:
    """vLLM on MERGED_MODEL_PATH (the symlink), as the README starts it."""
    settings = load_settings(first)
    with running(Path(settings.merged_model_path), merged_model_flags(settings),
                 storage.root / "vllm" / "merged.log") as server:
        yield server


@pytest.fixture(scope="module")
def lora_server(storage: Storage, first: dict[str, str]) -> Iterator[VllmServer]:
    """vLLM on the base model, ready for adapters loaded at runtime, as `vllm-lora` tells users."""
    flags, runtime_env, _ = vllm_lora(first, "demo-v1")
    settings = load_settings(first)
    with running(Path(settings.base_model_path), [*engine_flags(settings), *flags],
                 storage.root / "vllm" / "lora.log", runtime_env) as server:
        yield server


def load_adapter(server: VllmServer, env: dict[str, str], name: str) -> None:
    _, _, body = vllm_lora(env, name)
    server.call("POST", "/v1/load_lora_adapter", body)
    served = [m["id"] for m in server.call("GET", "/v1/models")["data"]]
    assert name in served, served


def answer(choice: dict) -> tuple[str, str]:
    return choice["message"]["content"].strip(), choice["finish_reason"]


def test_the_servers_flags_are_the_readmes():
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^\s*vllm serve /storage/models/merged-model.*?[^\\]$", readme, re.M | re.S)
    assert command, "README's vllm serve command"
    defaults = load_settings({**default_configmap(), "TRACKING": "none"})
    assert shlex.split(command.group(0).replace("\\\n", " ")) == [
        "vllm", "serve", defaults.merged_model_path, *merged_model_flags(defaults)]


def test_the_published_model_answers_as_trained_and_stops(merged_server: VllmServer, first: dict[str, str]):
    settings = load_settings(first)
    (model,) = merged_server.call("GET", "/v1/models")["data"]
    assert (model["id"], model["max_model_len"], model["root"]) == (
        settings.served_model_name, settings.max_model_len, settings.merged_model_path)
    assert answer(merged_server.chat(settings.served_model_name, DEMO_PROMPT)) == (DEMO_ANSWER, "stop")


def test_the_adapter_loaded_at_runtime_answers_like_the_merged_model(
        merged_server: VllmServer, lora_server: VllmServer, first: dict[str, str]):
    load_adapter(lora_server, first, "demo-v1")
    name = load_settings(first).served_model_name
    for prompt in PROMPTS:
        merged, adapter = merged_server.chat(name, prompt), lora_server.chat("demo-v1", prompt)
        assert (adapter["token_ids"], adapter["finish_reason"]) == (merged["token_ids"], merged["finish_reason"]), \
            (prompt, merged["message"]["content"], adapter["message"]["content"])
    assert answer(lora_server.chat("demo-v1", DEMO_PROMPT)) == (DEMO_ANSWER, "stop")


def test_an_adapter_vllm_refuses_fails_with_its_reason(lora_server: VllmServer, storage: Storage, tmp_path: Path):
    import torch
    from merge_helpers import make_adapter

    rank = int(lora_server.flags[lora_server.flags.index("--max-lora-rank") + 1])
    too_big = make_adapter(storage.base, tmp_path / "rank-too-big", torch.float32, r=rank * 2,
                           target_modules=["q_proj", "v_proj"])
    with pytest.raises(VllmError, match=f"LoRA rank {rank * 2} is greater than max_lora_rank {rank}") as refused:
        lora_server.call("POST", "/v1/load_lora_adapter", {"lora_name": "too-big", "lora_path": str(too_big)})
    assert "vLLM's last log lines" in str(refused.value)
    assert answer(lora_server.chat("demo-v1", DEMO_PROMPT)) == (DEMO_ANSWER, "stop"), "the server still serves"


def test_the_merge_hands_the_published_adapter_to_a_running_vllm(
        lora_server: VllmServer, storage: Storage, first: dict[str, str], tmp_path: Path):
    import torch
    from merge_helpers import make_adapter

    from entrypoint.errors import ConfigError, ExitCode
    from entrypoint.handoff import hand_off

    settings = load_settings(first)
    name = f"{settings.served_model_name}-v0001"
    result = run_entrypoint("merge", {**first, "VLLM_URL": lora_server.url}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"vLLM at {lora_server.url} serves adapter {name}" in result.stderr
    assert "restart the vLLM that reads" in result.stderr, "the merged model's step is said"
    assert name in [m["id"] for m in lora_server.call("GET", "/v1/models")["data"]]
    assert answer(lora_server.chat(name, DEMO_PROMPT)) == (DEMO_ANSWER, "stop")

    # vLLM refusing the adapter (a rank above its --max-lora-rank): a one-line reason with vLLM's own words.
    rank = int(lora_server.flags[lora_server.flags.index("--max-lora-rank") + 1])
    too_big = make_adapter(storage.base, tmp_path / "rank-too-big", torch.float32, r=rank * 2,
                           target_modules=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match=r"(?s)refused to load adapter .* as 'merged-model-v0009' \(HTTP \d+: .*"
                                        rf"LoRA rank {rank * 2} is greater than max_lora_rank {rank}") as refused:
        hand_off(lora_server.url, "", settings.served_model_name, "v0009-x", too_big, settings.merged_model_path)
    assert refused.value.exit_code == ExitCode.CONFIG
    assert name in [m["id"] for m in lora_server.call("GET", "/v1/models")["data"]], "nothing was unloaded"
    unreachable = run_entrypoint("merge", {**first, "VLLM_URL": "http://127.0.0.1:9"}, timeout=600)
    assert unreachable.returncode == ExitCode.TEMPORARY and "unreachable" in unreachable.stderr.splitlines()[-1]


def test_a_second_version_is_served_after_a_restart_and_its_adapter_at_runtime(
        storage: Storage, first: dict[str, str], merged_server: VllmServer, lora_server: VllmServer):
    from entrypoint.tinymodel import write_demo_data

    records = [{**r, "output": NEW_ANSWER} if r["instruction"] == DEMO_PROMPT else r for r in DEMO_RECORDS]
    write_demo_data(storage.root / "data-v2", records=records)
    # A new experiment gets its own output (the README's advice); the merge publishes it as the next version.
    second = train_and_merge(storage, DATASET_PATH=str(storage.root / "data-v2"),
                             LORA_OUTPUT_PATH=str(storage.root / "output" / "lora-adapter-v2"))
    settings = load_settings(second)
    assert Path(settings.merged_model_path).resolve().name.startswith("v0002-")
    name = settings.served_model_name

    assert answer(merged_server.chat(name, DEMO_PROMPT)) == (DEMO_ANSWER, "stop"), "a running vLLM keeps its model"
    merged_server.restart()
    assert answer(merged_server.chat(name, DEMO_PROMPT)) == (NEW_ANSWER, "stop")

    load_adapter(lora_server, second, "demo-v2")
    assert answer(lora_server.chat("demo-v2", DEMO_PROMPT)) == (NEW_ANSWER, "stop")
    assert answer(lora_server.chat("demo-v1", DEMO_PROMPT)) == (DEMO_ANSWER, "stop"), "both adapters are served"

    # The merge's hand-off: v0002's adapter loaded, v0001's unloaded; a rollback returns the old answers.
    handed = run_entrypoint("merge", {**second, "VLLM_URL": lora_server.url}, timeout=600)
    assert handed.returncode == 0, handed.stderr[-3000:]
    served = [m["id"] for m in lora_server.call("GET", "/v1/models")["data"]]
    assert f"{name}-v0002" in served and f"{name}-v0001" not in served
    assert answer(lora_server.chat(f"{name}-v0002", DEMO_PROMPT)) == (NEW_ANSWER, "stop")
    back = run_entrypoint("rollback", second)
    assert back.returncode == 0, back.stderr[-2000:]
    merged_server.restart()
    assert answer(merged_server.chat(name, DEMO_PROMPT)) == (DEMO_ANSWER, "stop"), "the rollback serves v0001"


def test_a_model_vllm_refuses_fails_with_its_reason_and_leaves_no_process(tiny_model: Path, tmp_path: Path):
    # MAX_MODEL_LEN beyond the model's positions: a configuration users can get wrong.
    short = shutil.copytree(tiny_model, tmp_path / "short-model")
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (short / "config.json").write_text(json.dumps(config))
    settings = load_settings({**default_configmap(), "TRACKING": "none"})
    server = VllmServer(VLLM_PYTHON, short, merged_model_flags(settings), tmp_path / "vllm.log", vllm_env())
    started = time.monotonic()
    with pytest.raises(VllmError, match="exited with code") as refused:
        server.start()
    assert time.monotonic() - started < 300
    assert "max_model_len" in refused.value.one_line() and "vLLM's last log lines" in str(refused.value)
    assert server.pgid and group_members(server.pgid) == []


def test_vllm_not_ready_within_the_bound_is_stopped(tiny_model: Path, tmp_path: Path):
    settings = load_settings({**default_configmap(), "TRACKING": "none"})
    server = VllmServer(VLLM_PYTHON, tiny_model, merged_model_flags(settings), tmp_path / "vllm.log", vllm_env())
    with pytest.raises(VllmError, match="not ready within 5 s"):
        server.start(timeout=5)
    assert server.pgid and group_members(server.pgid) == []


def test_missing_vllm_fails_and_says_how_to_install(tmp_path: Path):
    server = VllmServer(tmp_path / "no-venv" / "bin" / "python", tmp_path, [], tmp_path / "vllm.log", vllm_env())
    with pytest.raises(VllmError, match="not installed.*scripts/ensure-vllm.sh"):
        server.start()
