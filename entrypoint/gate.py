"""The publish gate: checks that a merged model works before the symlink vLLM reads switches to it.

A merge can be exact and still publish a useless or broken model: an adapter whose lora_B stayed zero (the
merge equals the base), a NaN that training produced, a tokenizer without its chat template or a generation
config without the template's stop token (vLLM then never stops). The checks, in order of cost:

- finite: every merged float tensor is finite;
- adapter_effect: every base tensor the adapter targets differs from the base's;
- tokenizer: tokenizer, chat template, EOS and pad tokens and generation_config.json agree with the template
  training used (its stop words, the first of which is the EOS when the template replaces it);
- probe, stops, eval_loss: the checks that run the model (gate_probe.py): the merged model's greedy tokens
  are base + adapter's, its generations stop, and (optionally) its loss on EVAL_DATASET is within a bar.

Memory: the first two stream the shards one tensor at a time (a merged tensor and its base tensor at most);
the model-running checks load one model at a time (merged, freed, then base + adapter), so the whole model
is never held twice. Models above PUBLISH_GATE_PROBE_MAX_GIB skip them, and the report says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint.companions import GENERATION_CONFIG, trained_eos
from entrypoint.errors import ConfigError
from entrypoint.files import read_json
from entrypoint.model_dir import BaseModel, has_tokenizer, read_base_model, token_ids

if TYPE_CHECKING:  # gate_probe imports Check from here
    from entrypoint.gate_probe import Example, ModelRun

log = logging.getLogger("entrypoint")

REPORT = "gate.json"  # in each published version: what the gate checked and found
PROBE_PROMPTS = 3
MODEL_CHECKS = ("probe", "stops")  # and eval_loss when PUBLISH_GATE_MAX_EVAL_LOSS is set
GIB = 1024**3
# What the model-running checks hold beside the weights, the adapter and the logits: transformers, PEFT, the
# tokenizer, the KV cache of a probe. Measured ~420 MiB on the benchmark model with torch already imported.
RUNTIME_BYTES = 512 * 1024**2
# Bytes per logit of the loss bar's longest record: bf16 logits, their float32 copy, the labelled rows and
# the log-softmax of the cross-entropy.
LOGIT_BYTES = 14
PROBE_LOGIT_POSITIONS = 64  # the probe's teacher-forced pass keeps 17 positions' logits, a generation step one


@dataclasses.dataclass
class Check:
    name: str
    status: str  # pass | fail | skipped
    detail: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GateReport:
    mode: str
    checks: list[Check]
    seconds: float = 0.0
    peak_rss_mib: float = 0.0

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "passed": self.passed, "seconds": round(self.seconds, 3),
                "peak_rss_mib": round(self.peak_rss_mib, 1), "checks": [dataclasses.asdict(c) for c in self.checks]}

    def reason(self) -> str:
        """One line naming the first failed check."""
        first = self.failed[0]
        more = f" (and {len(self.failed) - 1} more failed check(s): {', '.join(c.name for c in self.failed[1:])})" \
            if len(self.failed) > 1 else ""
        return f"publish gate: check {first.name} failed: {first.detail}{more}"


@dataclasses.dataclass(frozen=True)
class GateInputs:
    """What the merged directory is checked against."""

    base: BaseModel
    adapter: Path | None  # None: a full fine-tune (no adapter to compare with)
    targets: tuple[str, ...]  # base tensors the adapter changes
    template: Mapping[str, Any]  # training's chat template: name, stop_words, replace_eos
    max_eval_loss: str  # PUBLISH_GATE_MAX_EVAL_LOSS: whether there is an eval_loss check
    read_run: Callable[[], ModelRun]  # prompts, evaluation records, bounds: read only when the model runs
    probe_max_bytes: float
    cutoff_len: int  # the longest sequence a loss is computed on: its logits are the largest activations


def run_gate(model_dir: Path, inputs: GateInputs, mode: str) -> GateReport:
    """Every check on model_dir; the caller decides what a failure means (mode strict, warn)."""
    t0 = time.monotonic()
    merged = read_base_model(model_dir)
    checks = [*_stream_checks(merged, inputs), _tokenizer_check(model_dir, merged, inputs.template)]
    failed = [c.name for c in checks if c.status == "fail"]
    # The model-running checks load the model and render its chat template: pointless, or impossible, after
    # those failed.
    checks += [Check(name, "skipped", f"not run: {', '.join(failed)} failed") for name in _model_checks(inputs)] \
        if failed else _run_model(model_dir, merged, inputs)
    report = GateReport(mode, checks, time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for check in checks:
        log.log(logging.WARNING if check.status == "fail" else logging.INFO, "publish gate: %s %s: %s",
                check.name, check.status, check.detail)
    return report


def write_report(report: GateReport, path: Path) -> None:
    from entrypoint.files import atomic_write_json

    atomic_write_json(path, report.as_dict())


# ---- finite, adapter_effect: one streamed pass -------------------------------------------------------------

FLOAT_CODES = ("F64", "F32", "F16", "BF16")


CHUNK_BYTES = 8 << 20  # read and checked at once: the checks hold two such chunks, whatever the tensor's size


class _Reader:
    """Reads one safetensors file's tensors in chunks, into one reused buffer per role."""

    def __init__(self, header) -> None:
        self.header = header
        self.entries = header.by_name()
        self.file = open(header.path, "rb")  # noqa: SIM115 (closed by close)
        self.buffers: dict[str, Any] = {}

    def chunks(self, name: str, role: str = "a") -> Iterator[Any]:
        """The tensor's values, CHUNK_BYTES at a time (a multiple of every element size), as flat views of
        the role's buffer: each is overwritten by the next."""
        import torch

        from entrypoint.lora_merge import FLOAT_DTYPES

        entry = self.entries[name]
        buffer = self.buffers.get(role)
        if buffer is None:
            buffer = self.buffers[role] = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
        start = self.header.data_start + entry.start
        for done in range(0, entry.nbytes, CHUNK_BYTES):
            size = min(CHUNK_BYTES, entry.nbytes - done)
            view = buffer[:size]
            self.file.seek(start + done)
            if self.file.readinto(view.numpy().data) != size:
                raise ConfigError(f"{self.header.path} ended while reading {name!r}")
            yield view.view(FLOAT_DTYPES[entry.dtype])

    def close(self) -> None:
        self.file.close()


def _stream_checks(merged: BaseModel, inputs: GateInputs) -> list[Check]:
    import torch

    targets = set(inputs.targets)
    base_shards = {shard.path.name: shard for shard in inputs.base.shards}
    not_finite: list[str] = []
    unchanged: list[str] = []
    compared = 0
    base_readers: dict[str, _Reader] = {}
    try:
        for shard in merged.shards:
            reader = _Reader(shard)
            try:
                for entry in shard.entries:
                    if entry.dtype not in FLOAT_CODES:
                        continue
                    base_chunks = None
                    if entry.name in targets and entry.name in inputs.base.tensors:
                        compared += 1
                        base_shard, base_entry = inputs.base.tensors[entry.name]
                        if (base_entry.dtype, base_entry.nbytes) == (entry.dtype, entry.nbytes):
                            name = base_shard.path.name
                            if name not in base_readers:
                                base_readers[name] = _Reader(base_shards[name])
                            base_chunks = base_readers[name].chunks(entry.name, "base")
                    finite, equal = True, base_chunks is not None
                    for chunk in reader.chunks(entry.name):
                        finite = finite and bool(torch.isfinite(chunk).all())
                        if base_chunks is not None:
                            equal = torch.equal(chunk, next(base_chunks)) and equal
                    if not finite:
                        not_finite.append(entry.name)
                    if equal:
                        unchanged.append(entry.name)
            finally:
                reader.close()
    finally:
        for base_reader in base_readers.values():
            base_reader.close()
    finite = Check("finite", "fail" if not_finite else "pass",
                   f"{len(not_finite)} tensor(s) hold NaN or infinity, e.g. {', '.join(not_finite[:3])}"
                   if not_finite else "every float tensor is finite", {"not_finite": not_finite[:20]})
    if inputs.adapter is None:
        effect = Check("adapter_effect", "skipped", "a full fine-tune: no adapter to compare with")
    elif not targets:
        effect = Check("adapter_effect", "fail", "the adapter targets no tensor of the base")
    elif unchanged:
        effect = Check("adapter_effect", "fail",
                       f"{len(unchanged)} of {compared} tensors the adapter targets equal the base's (an all-zero "
                       f"lora_B, or an adapter that never trained), e.g. {', '.join(unchanged[:3])}",
                       {"unchanged": unchanged[:20], "targeted": compared})
    else:
        effect = Check("adapter_effect", "pass", f"all {compared} targeted tensors differ from the base's",
                       {"targeted": compared})
    return [finite, effect]


# ---- tokenizer, chat template, stop tokens ---------------------------------------------------------------

def chat_template_text(model_dir: Path) -> str | None:
    """The chat template vLLM would use: chat_template.jinja, chat_template.json or tokenizer_config.json's."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        value = (read_json(model_dir / name) or {}).get("chat_template")
        if isinstance(value, list):  # named templates: the default one
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        if isinstance(value, str) and value:
            return value
    return None


def _tokenizer_check(model_dir: Path, merged: BaseModel, template: Mapping[str, Any]) -> Check:
    problems = []
    if not has_tokenizer(model_dir):
        return Check("tokenizer", "fail", "no tokenizer beside the weights")
    ids = token_ids(model_dir)
    eos = trained_eos(model_dir)
    stop_words = [w for w in template.get("stop_words") or () if isinstance(w, str)]
    chat = chat_template_text(model_dir)
    if chat is None:
        problems.append("no chat template (tokenizer_config.json or chat_template.jinja): vLLM's chat endpoint "
                        "needs one")
    if eos is None:
        problems.append("the tokenizer declares no EOS token")
    elif ids and eos not in ids:
        problems.append(f"EOS {eos!r} is not in the vocabulary")
    if template.get("replace_eos") and stop_words and eos != stop_words[0]:
        problems.append(f"EOS is {eos!r}, TEMPLATE={template.get('name')} trained {stop_words[0]!r}")
    config = read_json(model_dir / "tokenizer_config.json") or {}
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if not pad:
        problems.append("the tokenizer declares no pad token")
    elif ids and pad not in ids:
        problems.append(f"pad token {pad!r} is not in the vocabulary")
    generation = read_json(model_dir / GENERATION_CONFIG)
    stops: list[Any] = []
    if generation is None:
        problems.append(f"no {GENERATION_CONFIG}: vLLM would stop only at config.json's EOS")
    else:
        raw = generation.get("eos_token_id")
        stops = [raw] if isinstance(raw, int) else list(raw or ())
        needed = [t for t in dict.fromkeys([eos, *stop_words]) if t and t in ids]
        missing = [t for t in needed if ids[t] not in stops]
        if missing:
            problems.append(f"{GENERATION_CONFIG} does not stop at {', '.join(map(repr, missing))} (eos_token_id "
                            f"{raw})")
    closing = stop_words[0] if stop_words else eos
    if chat is not None and closing and closing not in chat and "eos_token" not in chat:
        problems.append(f"the chat template never writes {closing!r}, the token generation stops at")
    data = {"eos": eos, "pad": pad, "stop_words": stop_words, "generation_eos_ids": stops,
            "template": template.get("name"), "chat_template": chat is not None}
    if problems:
        return Check("tokenizer", "fail", "; ".join(problems), data)
    return Check("tokenizer", "pass", f"EOS {eos!r}, stops {stops}, chat template present", data)


def _model_checks(inputs: GateInputs) -> tuple[str, ...]:
    return (*MODEL_CHECKS, *(("eval_loss",) if inputs.max_eval_loss else ()))


def _run_model(model_dir: Path, merged: BaseModel, inputs: GateInputs) -> list[Check]:
    size = sum(shard.data_bytes for shard in merged.shards)
    names = _model_checks(inputs)
    if size > inputs.probe_max_bytes:
        return [Check(name, "skipped", f"the model's weights ({size / GIB:.2f} GiB) exceed "
                      f"PUBLISH_GATE_PROBE_MAX_GIB={inputs.probe_max_bytes / GIB:g}: not loaded") for name in names]
    short = memory_shortage(size, merged, inputs)
    if short:
        return [Check(name, "skipped", f"{short}: not loaded") for name in names]
    run = inputs.read_run()  # LLaMA-Factory's converters: imported only when the model runs
    if not run.prompts and not run.eval_records:
        return [Check(name, "skipped", "no probe prompt could be read from the data") for name in names]
    from entrypoint.gate_probe import model_checks

    dtype = merged.config.get("torch_dtype") or "auto"
    return model_checks(model_dir, inputs.base.directory, inputs.adapter, dtype, run)


def model_run_bytes(weights: int, model: BaseModel, inputs: GateInputs) -> dict[str, int]:
    """About what the model-running checks add to the process, by part: one copy of the weights (the merged
    model is freed before base + adapter is loaded), the adapter in float32, the largest logits held at once
    (a whole CUTOFF_LEN record under the loss bar; else the probe's few positions), and the libraries."""
    adapter_bytes = 0
    if inputs.adapter is not None:
        adapter_bytes = sum(path.stat().st_size for path in inputs.adapter.glob("adapter_model*.safetensors"))
    vocab = int(model.config.get("vocab_size") or 0)
    positions = inputs.cutoff_len if inputs.max_eval_loss else PROBE_LOGIT_POSITIONS
    return {"weights": weights, "adapter": 2 * adapter_bytes, "logits": LOGIT_BYTES * positions * vocab,
            "libraries": RUNTIME_BYTES}


def memory_shortage(weights: int, model: BaseModel, inputs: GateInputs) -> str | None:
    """Why loading the model would get this container killed (exit 137, and a retry that merges again),
    or None when it fits or the memory left cannot be read."""
    from entrypoint.headroom import short_of, size

    parts = model_run_bytes(weights, model, inputs)
    need = sum(parts.values())
    left = short_of(need)
    if left is None:
        return None
    logits = f"a CUTOFF_LEN={inputs.cutoff_len} record's logits" if inputs.max_eval_loss else "logits"
    return (f"the model-running checks need about {size(need)} ({size(parts['weights'])} of weights, "
            f"{size(parts['adapter'])} of adapter, {size(parts['logits'])} of {logits}, ~{size(parts['libraries'])} of "
            f"libraries) and this container has {left.describe()}; raise the merge Job's memory limit by "
            f"{size(need - left.available)} or more, or set PUBLISH_GATE_PROBE_MAX_GIB below "
            f"{weights / GIB:.3g} to skip them")


def check_memory_before_merging(settings: Any, prepared: Any, adapter: Path | None) -> None:
    """Before the first byte of a merge is written: under PUBLISH_GATE=strict, a model the probe would load
    (not above PUBLISH_GATE_PROBE_MAX_GIB) that cannot fit this container's memory is a configuration error
    (exit 78), not hours of merging and then a kill; under warn the checks will be skipped, said now."""
    if settings.publish_gate == "off":
        return
    base = prepared.base
    weights = sum(shard.data_bytes for shard in base.shards)
    if prepared.plan.untie is not None:
        weights += base.tensors[prepared.plan.untie.source][1].nbytes
    if weights > settings.publish_gate_probe_max_gib * GIB:
        return
    inputs = gate_inputs(settings, base, adapter, (), None)
    short = memory_shortage(weights, base, inputs)  # torch is already imported: it counts as in use
    if short is None:
        return
    if settings.publish_gate == "strict":
        raise ConfigError(f"PUBLISH_GATE=strict: {short}. Nothing was merged")
    log.warning("publish gate: %s; the model-running checks will be skipped (PUBLISH_GATE=warn)", short)


# ---- inputs: from the merge, or from a version's manifest -------------------------------------------------

def read_examples(settings: Any, data: Any, limit: int) -> tuple[Example, ...]:
    """The first records of resolved datasets as chat messages up to the user's last turn (and the answer),
    converted by LLaMA-Factory's own dataset converters (its columns, formats and system prompts)."""
    from llamafactory.data.converter import DATASET_CONVERTERS
    from llamafactory.data.parser import DatasetAttr
    from llamafactory.hparams import DataArguments

    from entrypoint import datasets
    from entrypoint.gate_probe import Example
    from entrypoint.plan import llamafactory_args

    names = {f.name for f in dataclasses.fields(DataArguments) if f.init}
    data_args = DataArguments(**{k: v for k, v in llamafactory_args(settings, data).items() if k in names})
    root = Path("/") if data.generated else Path(settings.dataset_path)
    examples: list[Example] = []
    for name in data.names:
        attr = DatasetAttr("file", dataset_name=name)
        attr.join(data.info[name])
        convert = DATASET_CONVERTERS[attr.formatting](attr, data_args)
        for path in datasets.entry_files(name, data.info[name], root):
            for _, record in datasets.iter_records(path):
                example = convert(defaultdict(lambda: None, record))
                messages = [{"role": m["role"], "content": m["content"]} for m in example["_prompt"]]
                if example.get("_system"):
                    messages.insert(0, {"role": "system", "content": example["_system"]})
                if messages and messages[-1]["role"] == "user":
                    response = [{"role": m["role"], "content": m["content"]} for m in example["_response"] or ()]
                    examples.append(Example(messages, response[:1]))
                if len(examples) >= limit:
                    return tuple(examples)
    return tuple(examples)


def gate_inputs(settings: Any, base: BaseModel, adapter: Path | None, targets: Iterable[str],
                template: Mapping[str, Any] | None) -> GateInputs:
    return GateInputs(base, adapter, tuple(targets), dict(template or {}), settings.publish_gate_max_eval_loss,
                      functools.partial(model_run, settings), settings.publish_gate_probe_max_gib * GIB,
                      settings.cutoff_len)


def model_run(settings: Any) -> ModelRun:
    """What the model-running checks use. With EVAL_DATASET set its records give the probe prompts and the
    loss bar's records (a missing or malformed one is a configuration error); else the training data's first
    records give the prompts, when they can be read here."""
    from entrypoint import datasets
    from entrypoint.gate_probe import ModelRun

    evaluation = datasets.checked_eval(settings)
    records: tuple[Example, ...] = ()
    if evaluation is not None:
        wanted = settings.publish_gate_eval_records if settings.publish_gate_max_eval_loss else 0
        records = read_examples(settings, evaluation, max(wanted, PROBE_PROMPTS))
        prompts = records[:PROBE_PROMPTS]
        records = records[:wanted]
    else:
        try:
            from entrypoint.plan import build_plan

            prompts = read_examples(settings, build_plan(settings).data, PROBE_PROMPTS)
        except ConfigError as exc:  # e.g. an adapter trained elsewhere (MERGE_UNMARKED_ADAPTER), its data not here
            log.warning("publish gate: no probe prompts from the training data: %s", exc)
            prompts = ()
    return ModelRun(prompts, records, settings.publish_gate_max_eval_loss, settings.publish_gate_probe_tokens,
                    settings.publish_gate_probe_seconds, settings.cutoff_len)


def dumps(report: GateReport) -> str:
    return json.dumps(report.as_dict(), indent=2, ensure_ascii=False)


def gate_merge(settings: Any, inputs: Any, prepared: Any, workdir: Path, published: Any) -> GateReport | None:
    """The gate between the merge and the switch (merge.py): the report is written into the version to be;
    under PUBLISH_GATE=strict a failed check raises ConfigError (exit 78) and the served version stays."""
    if settings.publish_gate == "off":
        log.warning("publish gate off (PUBLISH_GATE=off): publishing without checking that the model works")
        return None
    adapter = None if inputs.full else inputs.adapter
    targets = prepared.plan.updates if adapter is not None else ()
    report = run_gate(workdir, gate_inputs(settings, prepared.base, adapter, targets, inputs.marker.get("template")),
                      settings.publish_gate)
    write_report(report, workdir / REPORT)
    if report.passed:
        log.info("publish gate passed in %.1fs (peak RSS %.0f MiB)", report.seconds, report.peak_rss_mib)
        return report
    if settings.publish_gate == "warn":
        log.warning("%s; publishing anyway (PUBLISH_GATE=warn)", report.reason())
        return report
    refused = published.versions / f"refused-{inputs.fingerprint[:12]}.{REPORT}"
    write_report(report, refused)
    current = published.current()
    serving = (f"{published.path} still serves {current.name}" if current
               else f"nothing was published at {published.path}")
    raise GateRefused(f"{report.reason()}; {serving} (report: {refused}; PUBLISH_GATE=warn publishes anyway)",
                      report, refused)


class GateRefused(ConfigError):
    """A failed check under PUBLISH_GATE=strict: exit 78, nothing switched."""

    def __init__(self, message: str, report: GateReport, path: Path) -> None:
        super().__init__(message)
        self.report = report
        self.path = path


def run(settings: Any, directory: str) -> int:
    """`python -m entrypoint verify DIR`: the gate's checks on a model directory (a published version, or
    MERGED_MODEL_PATH itself), against the adapter and base its .merge.json names (else LORA_OUTPUT_PATH and
    BASE_MODEL_PATH) and the template training recorded. Prints the report; exit 78 when a check fails."""
    from entrypoint.errors import ExitCode, finish
    from entrypoint.lora_merge import prepare_merge
    from entrypoint.publish import MANIFEST
    from entrypoint.storage import read_marker

    model_dir = Path(directory).resolve()
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"verify: {directory!r} is not a model directory (no config.json); expected a published "
                          "version or MERGED_MODEL_PATH")
    manifest = read_json(model_dir / MANIFEST) or {}
    adapter = Path(manifest.get("adapter_path") or settings.lora_output_path)
    base_dir = Path(manifest.get("base_model_path") or settings.base_model_path)
    template = manifest.get("template") or (read_marker(adapter) or {}).get("template") or {}
    full = not (adapter / "adapter_config.json").is_file()
    prepared = prepare_merge(model_dir if full else base_dir, None if full else adapter)
    targets = prepared.plan.updates if not full else ()
    report = run_gate(model_dir, gate_inputs(settings, prepared.base, None if full else adapter, targets, template),
                      "strict")
    print(dumps(report))
    if not report.passed:
        raise ConfigError(f"{report.reason()} ({model_dir})")
    return finish(ExitCode.OK, f"verified: {model_dir} passes the publish gate's checks")
