"""Table-driven bad input: each case exits with the documented code (78, or 75 for a dependency that may come
back), says what is wrong in one line (no traceback) on stderr and in the termination log, and leaves nothing
behind: no output, no published model, the user's data and models untouched.

Rows by category: environment, LLAMAFACTORY_CONFIG YAML, datasets, base models, storage and MLflow for
`train`; adapters and storage for `merge` (on an adapter trained once per session)."""

from __future__ import annotations

import http.server
import importlib.util
import json
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import Storage, run_entrypoint, snapshot

from entrypoint.errors import ExitCode


class FakeServer(http.server.BaseHTTPRequestHandler):
    """A fake MLflow server, for answers a real one does not give: a proxy's HTML page, a 401."""

    kind = "html"

    def do_GET(self):  # noqa: N802 - the http.server API
        if self.kind == "401":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"<html><body>Sign in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@dataclass
class BadInputStorage(Storage):
    """A storage whose cases may mount a read-only volume or start a fake server; all undone afterwards."""

    mounts: list[Path] = field(default_factory=list)
    servers: list[http.server.HTTPServer] = field(default_factory=list)

    def fake_server(self, kind: str) -> str:
        handler = type(f"Fake{kind}", (FakeServer,), {"kind": kind})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def storage(storage: Storage) -> Iterator[BadInputStorage]:
    extended = BadInputStorage(storage.root, storage.base)
    yield extended
    for server in extended.servers:
        server.shutdown()
    for mount in extended.mounts:
        subprocess.run(["umount", str(mount)], check=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _records(storage: Storage, records) -> None:
    _write(storage.data / "train_data.json", json.dumps(records))


def _yaml(storage: Storage, text: str) -> dict[str, str]:
    _write(storage.root / "extra.yaml", text)
    return {"LLAMAFACTORY_CONFIG": str(storage.root / "extra.yaml")}


def _model_without_config(storage: Storage) -> dict[str, str]:
    broken = storage.root / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"")
    return {"BASE_MODEL_PATH": str(broken)}


def _pickle_only_base(storage: Storage) -> dict[str, str]:
    """A base whose weights are a pickle (.bin): LLaMA-Factory would train it, the merge could not publish it."""
    base = storage.root / "models" / "pickled"
    shutil.copytree(storage.base, base)
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    return {"BASE_MODEL_PATH": str(base)}


def _base_copy(storage: Storage, name: str, **config_changes) -> Path:
    base = Path(shutil.copytree(storage.base, storage.root / "models" / name))
    config = json.loads((base / "config.json").read_text())
    config.update(config_changes)
    (base / "config.json").write_text(json.dumps(config))
    return base


def _custom_code_base(storage: Storage) -> dict[str, str]:
    base = _base_copy(storage, "custom", model_type="tinyllm", auto_map={"AutoModelForCausalLM": "modeling.TinyLM"})
    return {"BASE_MODEL_PATH": str(base)}


def _unknown_model_type(storage: Storage) -> dict[str, str]:
    return {"BASE_MODEL_PATH": str(_base_copy(storage, "unknown", model_type="tinyllm"))}


def _tied_gpt2_base(storage: Storage) -> dict[str, str]:
    """A GPT-2 base ties its head to its input embedding, and vLLM always ties them for GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from entrypoint.tinymodel import build_tokenizer

    base = storage.root / "models" / "gpt2"
    tokenizer = build_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=1, n_head=2)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return {"BASE_MODEL_PATH": str(base), "LORA_TARGET": "c_attn,wte"}


def _bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _broken_base(storage: Storage, change: Callable[[Path], None]) -> dict[str, str]:
    base = Path(shutil.copytree(storage.base, storage.root / "models" / "broken-base"))
    change(base)
    return {"BASE_MODEL_PATH": str(base)}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _read_only_storage(storage: Storage) -> dict[str, str]:
    """The output's volume mounted read-only (a tmpfs here; root ignores file modes, a mount does not)."""
    mount = storage.root / "read-only"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], check=True)
    storage.mounts.append(mount)
    return {"LORA_OUTPUT_PATH": str(mount / "lora-adapter")}


def _file_at_output(storage: Storage) -> dict[str, str]:
    output = storage.root / "output" / "taken"
    _write(output, "not a directory")
    return {"LORA_OUTPUT_PATH": str(output)}


def _html_server(storage: Storage) -> dict[str, str]:
    return {"TRACKING": "mlflow", "MLFLOW_TRACKING_URI": storage.fake_server("html")}


def _refusing_server(storage: Storage) -> dict[str, str]:
    return {"TRACKING": "mlflow", "MLFLOW_TRACKING_URI": storage.fake_server("401")}


def _closed_port(storage: Storage) -> dict[str, str]:
    from helpers import free_port

    return {"TRACKING": "mlflow", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
            "MLFLOW_TIMEOUT_SECONDS": "2"}


def _mlflow(uri: str) -> Callable[[Storage], dict[str, str]]:
    return lambda s: {"TRACKING": "mlflow", "MLFLOW_TRACKING_URI": uri}


def _jsonl(storage: Storage) -> dict[str, str]:
    (storage.data / "dataset_info.json").unlink()
    _write(storage.data / "lines.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    return {"DATASET": "lines"}


def _sharegpt(storage: Storage) -> dict[str, str]:
    _write(storage.data / "dataset_info.json", json.dumps(
        {"chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}}}))
    _write(storage.data / "chat.json", json.dumps([
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "again"}]},
    ]))
    return {"DATASET": "chat"}


def _jsonl_latin1(storage: Storage) -> dict[str, str]:
    (storage.data / "dataset_info.json").unlink()
    _bytes(storage.data / "lines.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9"}\n')
    return {"DATASET": "lines"}


def _history_not_pairs(storage: Storage) -> dict[str, str]:
    # Mapped, so that the records' history reaches LLaMA-Factory and its shape is what is refused.
    _write(storage.data / "dataset_info.json", json.dumps(
        {"train_data": {"file_name": "train_data.json", "columns": {
            "prompt": "instruction", "response": "output", "history": "history"}}}))
    _records(storage, [{"instruction": "q", "output": "a", "history": ["x"]}])
    return {}


def _sharegpt_unanswered(storage: Storage) -> dict[str, str]:
    _write(storage.data / "dataset_info.json", json.dumps(
        {"chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}}}))
    _write(storage.data / "chat.json", json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}]))
    return {"DATASET": "chat"}


def _deepspeed_absent(storage: Storage) -> dict[str, str]:
    # The dev environment (requirements.lock) has no deepspeed; the image installs it (docker/Dockerfile).
    assert importlib.util.find_spec("deepspeed") is None, "this case needs an environment without deepspeed"
    return {"DEEPSPEED": "zero3"}


def _malformed_eval_dataset(s: Storage) -> dict[str, str]:
    info = json.loads((s.data / "dataset_info.json").read_text())
    _write(s.data / "dataset_info.json", json.dumps({**info, "held_out": {**info["train_data"],
                                                                           "file_name": "held_out.json"}}))
    _write(s.data / "held_out.json", "[{oops")
    return {"EVAL_DATASET": "held_out"}


Case = tuple[str, Callable[[Storage], dict[str, str]], str]
CASES: list[Case] = [
    ("unknown-finetuning-type", lambda s: {"FINETUNING_TYPE": "qlora4"},
     "FINETUNING_TYPE='qlora4' is not valid: expected one of lora, qlora, full"),
    ("rank-not-a-number", lambda s: {"LORA_RANK": "eight"}, "LORA_RANK='eight' is not valid"),
    ("rank-zero", lambda s: {"LORA_RANK": "0"}, "LORA_RANK='0' is not valid: expected an integer >= 1"),
    ("negative-learning-rate", lambda s: {"LEARNING_RATE": "-1e-4"}, "LEARNING_RATE='-1e-4' is not valid"),
    ("epochs-nan", lambda s: {"NUM_EPOCHS": "nan"}, "NUM_EPOCHS='nan' is not valid"),
    ("batch-size-fraction", lambda s: {"BATCH_SIZE": "1.5"}, "BATCH_SIZE='1.5' is not valid: expected an integer"),
    ("cutoff-too-small", lambda s: {"CUTOFF_LEN": "4"}, "CUTOFF_LEN='4' is not valid"),
    ("relative-model-path", lambda s: {"BASE_MODEL_PATH": "models/base"},
     "BASE_MODEL_PATH='models/base' is not valid: expected an absolute path"),
    ("missing-model", lambda s: {"BASE_MODEL_PATH": str(s.root / "models" / "nope")}, "does not exist"),
    ("model-without-config", _model_without_config, "has no config.json"),
    ("base-weights-only-pickle", _pickle_only_base, "has no safetensors weights"),
    ("base-needs-its-own-code", _custom_code_base, "set TRUST_REMOTE_CODE=true to run it"),
    ("base-of-unknown-type", _unknown_model_type, "model_type 'tinyllm' is not one transformers"),
    ("tied-head-vllm-cannot-untie", _tied_gpt2_base, "which model type 'gpt2' cannot load in vLLM"),
    ("template-unknown", lambda s: {"TEMPLATE": "llama4000"}, "TEMPLATE='llama4000' is not a LLaMA-Factory chat "
     "template (did you mean"),
    ("missing-dataset-dir", lambda s: {"DATASET_PATH": str(s.root / "no-data")}, "is not a directory"),
    ("dataset-not-registered", lambda s: {"DATASET": "other"},
     "DATASET='other' is not in"),
    ("eval-dataset-not-registered", lambda s: {"EVAL_DATASET": "held_out"},
     "EVAL_DATASET='held_out' is not in"),
    ("eval-dataset-malformed", _malformed_eval_dataset, "held_out.json: not valid JSON"),
    ("eval-loss-bar-without-eval-dataset", lambda s: {"PUBLISH_GATE_MAX_EVAL_LOSS": "base"},
     "PUBLISH_GATE_MAX_EVAL_LOSS='base' needs EVAL_DATASET"),
    ("alpaca-record-without-output", lambda s: _records(s, [{"instruction": "q", "output": "a"}] * 3 + [
        {"instruction": "q", "input": ""}]) or {}, "record 4: field 'output' must be a non-empty string"),
    ("dataset-not-json", lambda s: _write(s.data / "train_data.json", "[{oops") or {}, "not valid JSON"),
    ("empty-dataset", lambda s: _records(s, []) or {}, "contains no records"),
    ("jsonl-bad-line", _jsonl, "line 2 is not valid JSON"),
    ("sharegpt-role-order", _sharegpt, "record 2: message 2 has from='human'"),
    ("field-not-mapped", lambda s: _records(s, [{"instruction": "q", "output": "a", "system": "Be brief."}]) or {},
     "record 1: field 'system' would be dropped"),
    ("hub-dataset", lambda s: _write(s.data / "dataset_info.json", json.dumps(
        {"train_data": {"hf_hub_url": "someone/data"}})) or {}, "only local files are supported"),
    ("qlora-without-cuda", lambda s: {"FINETUNING_TYPE": "qlora"}, "FINETUNING_TYPE=qlora needs a CUDA GPU"),
    ("tracking-without-uri", lambda s: {"TRACKING": "mlflow"}, "MLFLOW_TRACKING_URI is empty while TRACKING=mlflow"),
    ("yaml-sets-owned-key", lambda s: _yaml(s, "output_dir: /elsewhere\nlora_rank: 4\n"),
     "sets output_dir: these are owned by the entrypoint"),
    ("yaml-not-a-mapping", lambda s: _yaml(s, "- a\n- b\n"), "must be a mapping"),
    ("yaml-unknown-key", lambda s: _yaml(s, "lora_rnak: 4\n"), "LLaMA-Factory rejected the arguments"),
    ("output-inside-model", lambda s: {"LORA_OUTPUT_PATH": str(s.base / "out")}, "overlaps BASE_MODEL_PATH"),
    ("nproc-zero", lambda s: {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE='0' is not valid"),
    ("multinode-without-master", lambda s: {"NNODES": "2"}, "MASTER_ADDR is empty while NNODES=2"),
    ("node-rank-beyond-nnodes", lambda s: {"NNODES": "2", "MASTER_ADDR": "node0", "JOB_COMPLETION_INDEX": "2"},
     "is not below NNODES=2"),
    ("deepspeed-not-installed", _deepspeed_absent, "DEEPSPEED=zero3 needs the deepspeed package"),
    ("yaml-deepspeed-missing-file", lambda s: _yaml(s, "deepspeed: /nonexistent/ds.json\n"),
     "/nonexistent/ds.json is not a file"),
    # environment
    ("alpha-zero", lambda s: {"LORA_ALPHA": "0"}, "LORA_ALPHA='0' is not valid"),
    ("dropout-above-range", lambda s: {"LORA_DROPOUT": "1.5"}, "LORA_DROPOUT='1.5' is not valid"),
    ("warmup-above-one", lambda s: {"WARMUP_RATIO": "2"}, "WARMUP_RATIO='2' is not valid"),
    ("unknown-scheduler", lambda s: {"LR_SCHEDULER": "exp"}, "LR_SCHEDULER='exp' is not valid: expected one of"),
    ("unknown-precision", lambda s: {"PRECISION": "bf8"}, "PRECISION='bf8' is not valid"),
    ("unknown-dataset-format", lambda s: {"DATASET_FORMAT": "csv"}, "DATASET_FORMAT='csv' is not valid"),
    ("negative-max-samples", lambda s: {"MAX_SAMPLES": "-1"}, "MAX_SAMPLES='-1' is not valid"),
    ("save-steps-zero", lambda s: {"SAVE_STEPS": "0"}, "SAVE_STEPS='0' is not valid"),
    ("lock-ttl-too-short", lambda s: {"LOCK_TTL_SECONDS": "1"}, "LOCK_TTL_SECONDS='1' is not valid"),
    ("boolean-word", lambda s: {"REPLACE_OUTPUT": "maybe"}, "REPLACE_OUTPUT='maybe' is not valid: expected true or "
     "false"),
    ("learning-rate-above-one", lambda s: {"LEARNING_RATE": "2"}, "LEARNING_RATE='2' is not valid"),
    ("cutoff-not-a-number", lambda s: {"CUTOFF_LEN": "abc"}, "CUTOFF_LEN='abc' is not valid"),
    ("dataset-name-with-spaces", lambda s: {"DATASET": "my data"}, "DATASET='my data' is not valid"),
    ("lora-target-semicolons", lambda s: {"LORA_TARGET": "q_proj;v_proj"}, "LORA_TARGET='q_proj;v_proj' is not"),
    ("grace-too-short", lambda s: {"TERMINATION_GRACE_SECONDS": "1"}, "TERMINATION_GRACE_SECONDS='1' is not"),
    ("neftune-negative", lambda s: {"NEFTUNE_NOISE_ALPHA": "-1"}, "NEFTUNE_NOISE_ALPHA='-1' is not valid"),
    ("relative-dataset-path", lambda s: {"DATASET_PATH": "data"}, "DATASET_PATH='data' is not valid"),
    ("output-is-the-dataset-dir", lambda s: {"LORA_OUTPUT_PATH": str(s.data)}, "overlaps DATASET_PATH"),
    ("two-problems-at-once", lambda s: {"LORA_RANK": "x", "BATCH_SIZE": "0"},
     "BATCH_SIZE='0' is not valid: expected an integer >= 1 and <= 4096; LORA_RANK='x' is not valid"),
    # LLAMAFACTORY_CONFIG YAML
    ("yaml-value-of-wrong-type", lambda s: _yaml(s, "lora_rank: abc\n"),
     "lora_rank='abc' is not valid: expected an integer >= 1 and <= 1024"),
    ("yaml-rank-out-of-bounds", lambda s: _yaml(s, "lora_rank: 0\n"), "lora_rank=0 is not valid"),
    ("yaml-learning-rate-text", lambda s: _yaml(s, "learning_rate: fast\n"), "learning_rate='fast' is not valid"),
    ("yaml-list-for-a-number", lambda s: _yaml(s, "cutoff_len: [1, 2]\n"), "cutoff_len=[1, 2] is not valid"),
    ("yaml-option-of-wrong-type", lambda s: _yaml(s, "logging_first_step: sometimes\n"),
     "logging_first_step='sometimes' is not valid: expected a boolean"),
    ("yaml-not-yaml", lambda s: _yaml(s, "lora_rank: [unclosed\n"), "is not valid YAML"),
    ("yaml-missing-file", lambda s: {"LLAMAFACTORY_CONFIG": str(s.root / "nope.yaml")}, "is not a file"),
    ("yaml-unknown-template", lambda s: _yaml(s, "template: nope\n"), "TEMPLATE='nope' is not a LLaMA-Factory"),
    ("yaml-sets-dataset", lambda s: _yaml(s, "dataset: other\n"), "sets dataset: these are owned"),
    # datasets
    ("dataset-latin1-bytes", lambda s: _bytes(s.data / "train_data.json",
                                              b'[{"instruction": "caf\xe9", "output": "x"}]') or {},
     "train_data.json: byte 21 (line 1) is 0xe9, not UTF-8"),
    ("jsonl-latin1-bytes", _jsonl_latin1, "lines.jsonl: byte 56 (line 2) is 0xe9, not UTF-8"),
    ("record-not-an-object", lambda s: _records(s, ["just text"]) or {}, "record 1: must be a JSON object"),
    ("instruction-not-text", lambda s: _records(s, [{"instruction": 5, "output": "a"}]) or {},
     "field 'instruction' must be a non-empty string"),
    ("history-not-pairs", _history_not_pairs, "field 'history' must be a list of [question, answer] string pairs"),
    ("dataset-info-not-json", lambda s: _write(s.data / "dataset_info.json", "{nope") or {},
     "dataset_info.json: not valid JSON"),
    ("dataset-info-without-file-name", lambda s: _write(s.data / "dataset_info.json", json.dumps(
        {"train_data": {"formatting": "alpaca"}})) or {}, "entry 'train_data' has no file_name"),
    ("dataset-info-unknown-formatting", lambda s: _write(s.data / "dataset_info.json", json.dumps(
        {"train_data": {"file_name": "train_data.json", "formatting": "csv"}})) or {},
     "formatting 'csv' is not supported"),
    ("dataset-file-missing", lambda s: _write(s.data / "dataset_info.json", json.dumps(
        {"train_data": {"file_name": "gone.json"}})) or {}, "file_name 'gone.json' not found"),
    ("sharegpt-ends-with-user", _sharegpt_unanswered, "the conversation must end with an assistant message"),
    # base models
    ("base-config-not-json", lambda s: _broken_base(s, lambda b: _write(b / "config.json", "{oops")),
     "config.json is not valid JSON"),
    ("base-config-without-model-type", lambda s: _broken_base(
        s, lambda b: _write(b / "config.json", json.dumps({"architectures": ["X"]}))), "has no model_type"),
    ("base-without-tokenizer", lambda s: _broken_base(s, lambda b: [p.unlink() for p in b.glob("tokenizer*")]),
     "holds no tokenizer"),
    ("base-truncated-shard", lambda s: _broken_base(s, lambda b: _truncate(b / "model.safetensors")),
     "model.safetensors"),
    ("base-is-a-file", lambda s: _write(s.root / "models" / "a-file", "x") or {
        "BASE_MODEL_PATH": str(s.root / "models" / "a-file")}, "does not exist or is not a directory"),
    # storage
    ("output-is-a-file", _file_at_output, "it is a file, not a directory"),
    ("read-only-storage", _read_only_storage, "the storage is mounted read-only"),
    # MLflow
    ("mlflow-uri-misspelt-scheme", _mlflow("htp:/x"), "scheme 'htp' is not supported"),
    ("mlflow-uri-databricks", _mlflow("databricks"), "MLFLOW_TRACKING_URI='databricks' is neither a URL"),
    ("mlflow-uri-without-scheme", _mlflow("mlflow:5000"), "scheme 'mlflow' is not supported"),
    ("mlflow-uri-port-out-of-range", _mlflow("http://mlflow:99999"), "Port out of range"),
    ("mlflow-uri-broken-ipv6", _mlflow("http://[::1:5000"), "Invalid IPv6 URL"),
    ("mlflow-uri-without-host", _mlflow("http://:5000"), "has no host"),
    ("mlflow-uri-credentials-hidden", _mlflow("htp://alice:s3cr3t@mlflow"), "'htp://***@mlflow'"),
    ("mlflow-refuses-credentials", _refusing_server, "refused the credentials (HTTP 401)"),
]

# Dependencies that may come back: exit 75, the Job retries.
TEMPORARY: list[Case] = [
    ("mlflow-unreachable", _closed_port, "is unreachable"),
    ("mlflow-answers-html", _html_server, "not MLflow's JSON API"),
]


def _refused(storage: Storage, command: str, setup: Callable[[Storage], dict[str, str]], code: ExitCode,
             expected: str, env: dict[str, str] | None = None) -> None:
    overrides = setup(storage)
    data_before, model_before = snapshot(storage.data), snapshot(storage.base)
    published_before = snapshot(storage.root / "models")
    result = run_entrypoint(command, {**storage.env(**(env or {})), **overrides}, timeout=120)
    assert result.returncode == code, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and expected in error[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert storage.termination_log() == f"exit {int(code)}: {error[0].removeprefix('error: ')}\n"
    assert snapshot(storage.data) == data_before
    assert snapshot(storage.base) == model_before
    assert snapshot(storage.root / "models") == published_before, "the published model changed"
    assert "s3cr3t" not in result.stderr + storage.termination_log(), "a secret reached the output"


@pytest.mark.parametrize(("name", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_leaves_nothing(storage: Storage, name, setup, expected):
    _refused(storage, "train", setup, ExitCode.CONFIG, expected)
    assert not storage.output.exists(), "a refused run created its output directory"
    assert not (storage.output.parent / f".{storage.output.name}.lock").exists()


@pytest.mark.parametrize(("name", "setup", "expected"), TEMPORARY, ids=[c[0] for c in TEMPORARY])
def test_an_unavailable_dependency_is_retried_and_leaves_nothing(storage: Storage, name, setup, expected):
    _refused(storage, "train", setup, ExitCode.TEMPORARY, expected)
    assert not storage.output.exists()


def test_usage_error_is_a_config_error(storage: Storage):
    result = run_entrypoint("trian", storage.env())
    assert result.returncode == ExitCode.CONFIG
    assert "invalid choice: 'trian'" in result.stderr


# --- merge: adapters and storage -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """An adapter trained once for the merge cases (two steps)."""
    from entrypoint.tinymodel import write_demo_data

    root = tmp_path_factory.mktemp("bad-merge") / "storage"
    write_demo_data(root / "data")
    trained = Storage(root, tiny_model)
    result = run_entrypoint("train", trained.env(MAX_STEPS="2", SAVE_STEPS="2"))
    assert result.returncode == 0, result.stderr[-2000:]
    return trained.output


def _adapter_file(name: str, change: Callable[[Path], object]) -> Callable[[Storage], dict[str, str]]:
    def setup(storage: Storage) -> dict[str, str]:
        change(storage.output / name)
        return {}

    return setup


def _other_base_weights(storage: Storage) -> dict[str, str]:
    from entrypoint.tinymodel import make_tiny_model

    other = make_tiny_model(storage.root / "models" / "retrained", seed=9)
    return {"BASE_MODEL_PATH": str(other)}


def _read_only_models(storage: Storage) -> dict[str, str]:
    mount = storage.root / "read-only-models"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], check=True)
    storage.mounts.append(mount)
    return {"MERGED_MODEL_PATH": str(mount / "merged-model")}


def _merged_path_is_a_file(storage: Storage) -> dict[str, str]:
    target = storage.root / "elsewhere" / "merged-model"
    _write(target, "a file")
    return {"MERGED_MODEL_PATH": str(target)}


def _dora(path: Path) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": True}))


MERGE_CASES: list[Case] = [
    ("adapter-config-not-json", _adapter_file("adapter_config.json", lambda p: p.write_text("{")),
     "adapter config"),
    ("adapter-weights-missing", _adapter_file("adapter_model.safetensors", lambda p: p.unlink()),
     "has no adapter_model.safetensors"),
    ("adapter-weights-truncated", _adapter_file("adapter_model.safetensors", _truncate), "adapter_model.safetensors"),
    ("adapter-is-dora", _adapter_file("adapter_config.json", _dora), "DoRA"),
    ("adapter-rank-contradicts-config", _adapter_file("adapter_config.json", lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "r": 4}))), "gives rank 4"),
    ("adapter-trained-on-other-weights", _other_base_weights, "is not the base the adapter was trained on"),
    ("adapter-without-marker", lambda s: shutil.rmtree(s.output / ".job") or {}, "MERGE_UNMARKED_ADAPTER=true"),
    ("adapter-missing", lambda s: shutil.rmtree(s.output) or {}, "does not exist. Train first"),
    ("merged-path-is-a-file", _merged_path_is_a_file, "is a file, not a model directory"),
    ("merged-path-read-only", _read_only_models, "the storage is mounted read-only"),
]


@pytest.mark.parametrize(("name", "setup", "expected"), MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_bad_merge_input_is_refused_and_publishes_nothing(storage: Storage, trained_adapter: Path, name, setup,
                                                           expected):
    shutil.copytree(trained_adapter, storage.output)
    _refused(storage, "merge", setup, ExitCode.CONFIG, expected)
    assert not (storage.root / "models" / "merged-model").exists()
    assert not (storage.root / "models" / "merged-model.versions").exists()
