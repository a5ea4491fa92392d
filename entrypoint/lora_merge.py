"""Merge a PEFT LoRA adapter into its base model, one tensor at a time, exactly as PEFT would.

Memory stays at about one tensor (plus torch itself) whatever the model size: each base shard is
rewritten tensor by tensor into a file of the same name, layout and dtype; tensors the adapter does
not touch are copied file-to-file by the kernel, and each adapter tensor is read once, when its base
tensor comes up. Targeted tensors get W + scale * (B @ A), computed in float32 (the arithmetic of
PEFT's merge_and_unload with its float32 adapter weights) and rounded once to the base dtype, so
the result is bit-identical to PEFT's.

Everything that can be checked from JSON files and safetensors headers (options, names, shapes,
truncated files) is checked before the first byte is written. The caller owns `out_dir`: an empty
temporary directory it publishes or deletes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from entrypoint.errors import ConfigError
from entrypoint.files import fsync_path
from entrypoint.lora_inputs import AdapterConfig, parse_adapter_key, read_adapter
from entrypoint.model_dir import (
    OUTPUT_EMBEDDING,
    UNTIE_MODEL_TYPES,
    BaseModel,
    added_tokens,
    read_base_model,
    tied_embeddings_problem,
    tied_input_embedding,
)
from entrypoint.safetensors_stream import (
    FileHeader,
    TensorEntry,
    copy_range,
    encode_header,
    write_all,
)

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# transformers' loader only checks that the metadata says "pt".
SHARD_METADATA = {"format": "pt"}
# Adapter options that change what "merged" means; PEFT merges none of them into plain weights the
# same way, so they are refused rather than approximated.
UNMERGEABLE_OPTIONS = {
    "use_dora": "DoRA (use_dora: true) rescales every merged row by a learned magnitude; this merge does "
                "not implement it: train without DoRA, or merge with PEFT's merge_and_unload",
    "layer_replication": "layer_replication duplicates base layers; the merged model would need a new layout",
    "trainable_token_indices": "trainable_token_indices (trainable token embeddings) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters, e.g. MoE experts) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation "
                               "tokens: a merged weight cannot express that",
}
# These initialisations change the base weights during training; the adapter only fits the modified
# base unless it was converted back (PEFT's path_initial_model_for_weight_conversion).
BASE_ALTERING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclasses.dataclass(frozen=True)
class MergeProgress:
    """Reported after each shard is written."""

    shard_index: int  # 1-based
    shard_count: int
    shard_name: str
    bytes_done: int  # tensor bytes written so far, all shards
    bytes_total: int


@dataclasses.dataclass(frozen=True)
class MergeResult:
    output_bytes: int  # every file written into out_dir
    shards: int
    tensors_merged: int  # base tensors changed by the adapter (0 when copying a full fine-tune)
    dtype: str  # the weights' dtype (the one holding most bytes), e.g. "bfloat16"
    copied_files: tuple[str, ...]  # files beside the weights: config, tokenizer, ... (companions.py)
    untied: bool = False  # lm_head was written as a tensor of its own (see _Untie)


@dataclasses.dataclass
class _Update:
    """What happens to one base tensor; every field names adapter tensors by key."""

    replacement: str | None = None  # a trained full copy replaces the base values
    lora: tuple[str, str, float, bool] | None = None  # (A key, B key, scale, transpose B @ A)
    # lora_B.bias and its module's scale. The trained forward pass scales it (B(Ax) + b) * scale; PEFT 0.15.2's
    # merge adds it unscaled (peft issue 2486, fixed in later releases): merged here as training computed it.
    bias_delta: tuple[str, float] | None = None


@dataclasses.dataclass
class _Untie:
    """A base that ties its output embeddings to its input embeddings, and an adapter that changes one of
    them. The trained model computes the output from the base's embedding while the input embedding changed
    (or the other way round): the merged model stores its own lm_head and stops tying, which is exactly
    the function that was trained. (PEFT's merge_and_unload keeps the tie and changes both.)"""

    source: str  # the base's input embedding tensor, the new lm_head's starting values
    shard: str  # the base shard holding it; the new tensor is appended to the same output shard
    update: _Update  # what the adapter does to lm_head itself (nothing when only the input embedding changed)


ProgressCallback = Callable[[MergeProgress], None]


@dataclasses.dataclass(frozen=True)
class PreparedMerge:
    """A merge checked from JSON and headers alone, before anything is written."""

    base: BaseModel
    adapter_dir: Path | None
    plan: _MergePlan


def prepare_merge(base_dir: Path, adapter_dir: Path | None) -> PreparedMerge:
    """Check the inputs and decide what each adapter tensor changes; ConfigError names what cannot be merged."""
    base = read_base_model(base_dir)
    plan = _plan(base, adapter_dir) if adapter_dir is not None else _MergePlan({}, None, None)
    return PreparedMerge(base, adapter_dir, plan)


def working_bytes(prepared: PreparedMerge) -> tuple[int, str | None]:
    """About the most the streaming merge holds at once beside torch, and the base tensor that sets it: its
    scratch buffers grow to the largest targeted tensor (two weight buffers in its dtype, one being written
    while the next is computed, and its float32 update), the widening chunk, and the adapter tensors read
    for one target (a full copy twice: read, then converted while the previous one is written)."""
    plan, base = prepared.plan, prepared.base
    adapter = plan.header.by_name() if plan.header is not None else {}
    items = list(plan.updates.items())
    if plan.untie is not None and plan.untie.update != _Update():
        items.append((plan.untie.source, plan.untie.update))
    weight = delta = reads = 0
    largest = None
    for target, update in items:
        entry = base.tensors[target][1]
        numel = math.prod(entry.shape)
        read = 0
        if update.lora is not None:
            a, b = adapter[update.lora[0]], adapter[update.lora[1]]
            wide = 8 if "F64" in (a.dtype, b.dtype) else 4
            delta = max(delta, wide * numel)
            read += a.nbytes + b.nbytes + wide * (math.prod(a.shape) + math.prod(b.shape))
            if entry.nbytes > weight:
                weight, largest = entry.nbytes, target
        if update.replacement is not None:
            read += 2 * (adapter[update.replacement].nbytes + entry.nbytes)
            largest = largest or target
        reads = max(reads, read)
    return 2 * weight + delta + 4 * ADD_CHUNK + reads, largest


def check_memory(prepared: PreparedMerge) -> None:
    """Refuse, before the first byte, a merge this container's memory limit cannot hold: the kernel would kill
    it (exit 137) partway, and the Job's retry would start over and be killed again."""
    from entrypoint.headroom import short_of, size

    need, largest = working_bytes(prepared)
    left = short_of(need)
    if left is None:
        return
    raise ConfigError(f"the merge needs about {size(need)} beside what is already loaded (its largest targeted tensor "
                      f"{largest}: two copies in its dtype and its float32 update), and this container has "
                      f"{left.describe()}; raise the merge Job's memory limit by {size(need - left.available)} "
                      "or more. Nothing was merged")


def merge_adapter(
    base_dir: Path | PreparedMerge,
    adapter_dir: Path | None,
    out_dir: Path,
    progress: ProgressCallback | None = None,
    stop_tokens: tuple[str, ...] = (),
) -> MergeResult:
    """Write base + adapter into the empty directory `out_dir`; `adapter_dir` None copies a full model.

    The files beside the weights are the ones training used (companions.py): its tokenizer and chat
    template, and a generation config that stops at its EOS and at `stop_tokens` (the template's stop words).
    Raises ConfigError, naming the file, tensor or option, for inputs that cannot be merged exactly;
    `prepare_merge` raises them before anything is written.
    """
    from entrypoint.companions import write_companions

    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise ValueError(f"out_dir {out_dir} must be an existing empty directory")
    prepared = base_dir if isinstance(base_dir, PreparedMerge) else prepare_merge(base_dir, adapter_dir)
    base, plan, adapter_dir = prepared.base, prepared.plan, prepared.adapter_dir
    base_dir = base.directory

    bytes_total = sum(shard.data_bytes for shard in base.shards)
    bytes_done = 0
    scratch = _Scratch()

    def on_disk(number: int, fsynced: Future[Future[None]]) -> None:
        nonlocal bytes_done
        writer.wait(fsynced)
        fsynced.result().result()
        shard = base.shards[number - 1]
        bytes_done += shard.data_bytes
        if progress is not None:
            progress(MergeProgress(number, len(base.shards), shard.path.name, bytes_done, bytes_total))

    with contextlib.ExitStack() as stack:
        stack.enter_context(_one_torch_thread())
        adapter = stack.enter_context(_TensorReader(plan.header)) if plan.header else None
        writer = stack.enter_context(_Writer())
        previous: tuple[int, Future[Future[None]]] | None = None
        for number, shard in enumerate(base.shards, start=1):
            untie = plan.untie if plan.untie is not None and plan.untie.shard == shard.path.name else None
            fsynced = _write_shard(shard, out_dir / shard.path.name, plan.updates, adapter, scratch, writer, untie)
            # A shard's fsync overlaps the next shard's writes, never more; it counts as written once on disk.
            if previous is not None:
                on_disk(*previous)
            previous = (number, fsynced)
        if previous is not None:
            on_disk(*previous)
        writer.wait()
    if base.index is not None:
        _write_index(base, out_dir, plan.untie)
    trained = adapter_dir if adapter_dir is not None else base_dir
    copied = write_companions(base, out_dir, trained, untied=plan.untie is not None, stop_tokens=stop_tokens)
    fsync_path(out_dir)
    return MergeResult(
        output_bytes=sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()),
        shards=len(base.shards),
        tensors_merged=len(plan.updates) + (1 if plan.untie is not None else 0),
        dtype=_main_dtype(base),
        copied_files=copied,
        untied=plan.untie is not None,
    )


@dataclasses.dataclass(frozen=True)
class _MergePlan:
    updates: dict[str, _Update]
    header: FileHeader | None  # the adapter's weights
    untie: _Untie | None


class _Targets:
    """The base tensors an adapter can change: the base's own, plus lm_head on a base that ties it to the
    input embedding (its values start as the embedding's; see _Untie)."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.tied_source = tied_input_embedding(base)

    def resolve(self, name: str) -> str | None:
        found = self.base.resolve(name)
        if found is None and self.tied_source is not None and name == OUTPUT_EMBEDDING:
            return OUTPUT_EMBEDDING
        return found

    def entry(self, target: str) -> tuple[FileHeader, TensorEntry]:
        if target not in self.base.tensors and target == OUTPUT_EMBEDDING and self.tied_source is not None:
            shard, source = self.base.tensors[self.tied_source]
            return shard, dataclasses.replace(source, name=OUTPUT_EMBEDDING)
        return self.base.tensors[target]


def _plan(base: BaseModel, adapter_dir: Path) -> _MergePlan:
    """Decide from headers alone which base tensor each adapter tensor changes; refuse what does not fit."""
    config, header = read_adapter(adapter_dir)
    problems = _option_problems(config, base)
    if problems:
        raise ConfigError(f"cannot merge adapter {adapter_dir}: " + "; ".join(problems))
    extra_tokens = added_tokens(adapter_dir, base.directory)
    if extra_tokens:
        raise ConfigError(
            f"adapter {adapter_dir} saved a tokenizer with {len(extra_tokens)} tokens the base lacks "
            f"(e.g. {', '.join(map(repr, extra_tokens[:5]))}): the vocabulary was resized during training, "
            "which this merge does not support; train without new tokens (new_special_tokens/resize_vocab)"
        )

    adapter = header.by_name()
    targets = _Targets(base)
    modules: dict[str, dict[str, str]] = {}
    updates: dict[str, _Update] = {}
    for name in adapter:
        parsed = parse_adapter_key(name)
        if parsed.kind == "unknown":
            problems.append(f"adapter tensor {name} is not a LoRA weight this merge knows how to apply")
        elif parsed.kind == "full":
            target = _resolve(targets, parsed.parameter, name, problems)
            if target is None:
                continue
            update = updates.setdefault(target, _Update())
            if update.replacement is not None:
                problems.append(f"adapter tensors {update.replacement} and {name} both replace {target}")
            update.replacement = name
            _check_full_copy(targets, adapter[name], target, problems)
        else:
            modules.setdefault(parsed.module, {})[parsed.kind] = name
    for module, parts in modules.items():
        _plan_module(targets, config, adapter, module, parts, updates, problems)
    problems += _orientation_problems(targets, config, updates)
    untie = _plan_untie(targets, updates, problems)
    for target in updates:
        entry = base.tensors[target][1]
        if entry.dtype not in FLOAT_DTYPES:
            problems.append(f"base tensor {target} is {entry.dtype}: not a float weight a merge can change")
    for name, entry in adapter.items():
        if entry.dtype not in FLOAT_DTYPES:
            problems.append(f"adapter tensor {name} is {entry.dtype}; expected F32, BF16, F16 or F64")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ConfigError(f"cannot merge adapter {adapter_dir} into {base.directory}: " + "; ".join(shown))
    return _MergePlan(updates, header, untie)


def _plan_untie(targets: _Targets, updates: dict[str, _Update], problems: list[str]) -> _Untie | None:
    """On a tied base, an adapter that changes the input embedding or lm_head makes the two differ."""
    source = targets.tied_source
    if source is None or (OUTPUT_EMBEDDING not in updates and source not in updates):
        return None
    model_type = targets.base.config.get("model_type")
    if model_type not in UNTIE_MODEL_TYPES:
        problems.append(tied_embeddings_problem(model_type))
        return None
    shard = targets.base.tensors[source][0].path.name
    return _Untie(source, shard, updates.pop(OUTPUT_EMBEDDING, _Update()))


def _option_problems(config: AdapterConfig, base: BaseModel) -> list[str]:
    raw = config.raw
    problems = []
    if raw.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {raw.get('peft_type')!r}: only LoRA adapters can be merged")
    problems += [why for option, why in UNMERGEABLE_OPTIONS.items() if raw.get(option)]
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_ALTERING_INITS):
        problems.append(
            f"init_lora_weights={raw['init_lora_weights']!r} changes the base weights during training: "
            "convert the adapter to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )
    if raw.get("bias", "none") not in ("none", "all", "lora_only"):
        problems.append(f"bias={raw['bias']!r} is not one of none, all, lora_only")
    quantization = base.config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        problems.append(
            f"the base model is quantized ({method}, config.json has quantization_config): merging into "
            "quantized weights loses the update; merge into the original unquantized base model"
        )
    return problems


def _resolve(targets: _Targets, parameter: str, adapter_key: str, problems: list[str]) -> str | None:
    target = targets.resolve(parameter)
    if target is None:
        problems.append(f"adapter tensor {adapter_key} has no matching base tensor {parameter}: the adapter was "
                        "made for another base model")
    return target


def _check_full_copy(targets: _Targets, entry: TensorEntry, target: str, problems: list[str]) -> None:
    shard, base_entry = targets.entry(target)
    if entry.shape == base_entry.shape:
        return
    resized = (
        " (the vocabulary was resized during training: not supported)"
        if len(entry.shape) == 2 and entry.shape[1:] == base_entry.shape[1:] else ""
    )
    problems.append(
        f"adapter tensor {entry.name} has shape {list(entry.shape)} but base tensor {target} in "
        f"{shard.path.name} has {list(base_entry.shape)}{resized}"
    )


def _plan_module(
    targets: _Targets,
    config: AdapterConfig,
    adapter: dict[str, TensorEntry],
    module: str,
    parts: dict[str, str],
    updates: dict[str, _Update],
    problems: list[str],
) -> None:
    """Plan one LoRA module: its A/B pair (linear or embedding) and an optional lora_B bias."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    expected = {a_kind, b_kind} | ({"lora_B.bias"} if "lora_B.bias" in parts else set())
    if set(parts) != expected:
        problems.append(f"LoRA module {module} has {sorted(parts)}, expected {sorted(expected)}")
        return
    a, b = adapter[parts[a_kind]], adapter[parts[b_kind]]
    if len(a.shape) != 2 or len(b.shape) != 2:
        problems.append(f"LoRA module {module} is not a linear or embedding layer (lora_A shape "
                        f"{list(a.shape)}): LoRA on convolutions is not supported")
        return
    rank, _ = config.rank_and_alpha(module)
    if a.shape[0] != rank or b.shape[1] != rank:
        problems.append(f"adapter_config.json gives rank {rank} for {module} (r / rank_pattern) but its "
                        f"{a_kind} is {list(a.shape)} and {b_kind} is {list(b.shape)}")
        return
    target = _resolve(targets, f"{module}.weight", a.name, problems)
    if target is None:
        return
    shard, entry = targets.entry(target)
    straight, transposed = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
    # PEFT transposes B @ A for embeddings, and for Conv1D layers (GPT-2; fan_in_fan_out). It flips the
    # flag per layer type while wrapping, so the saved flag can be stale for some layers: prefer it, and
    # take the other orientation when only that one fits the base tensor.
    prefer = True if embedding else bool(config.raw.get("fan_in_fan_out"))
    if entry.shape == (transposed if prefer else straight):
        transpose = prefer
    elif not embedding and entry.shape == (straight if prefer else transposed):
        transpose = not prefer
    else:
        problems.append(
            f"adapter tensors {a.name} {list(a.shape)} and {b.name} {list(b.shape)} give an update of shape "
            f"{list(transposed if prefer else straight)}, but base tensor {target} in {shard.path.name} has "
            f"shape {list(entry.shape)}: the adapter was made for another base model"
        )
        return
    update = updates.setdefault(target, _Update())
    if update.lora is not None:
        problems.append(f"two LoRA modules change base tensor {target} ({update.lora[0]} and {a.name})")
        return
    update.lora = (a.name, b.name, config.scale(module), transpose)
    if "lora_B.bias" in parts:
        _plan_bias(targets, adapter[parts["lora_B.bias"]], module, config.scale(module), updates, problems)


def _orientation_problems(targets: _Targets, config: AdapterConfig, updates: dict[str, _Update]) -> list[str]:
    """Refuse when the saved fan_in_fan_out flag is known to be stale and a square tensor needs it.

    A non-square tensor shows its orientation; a square one relies on the flag, which PEFT rewrites
    per wrapped layer type (GPT-2's Conv1D layers plus a Linear lm_head leave it wrong for some).
    """
    flag = bool(config.raw.get("fan_in_fan_out"))
    linear = {t: u.lora for t, u in updates.items() if u.lora and not u.lora[0].endswith("lora_embedding_A")}
    flipped = [target for target, lora in linear.items() if lora[3] != flag]
    square = [target for target in linear if len(set(targets.entry(target)[1].shape)) == 1]
    if flipped and square:
        return [f"fan_in_fan_out={flag} in adapter_config.json does not fit {flipped[0]}, so the orientation "
                f"of square tensors such as {square[0]} is unknown: this adapter cannot be merged exactly"]
    return []


def _plan_bias(
    targets: _Targets, bias: TensorEntry, module: str, scale: float, updates: dict[str, _Update],
    problems: list[str],
) -> None:
    target = targets.base.resolve(f"{module}.bias")
    if target is None:
        problems.append(f"adapter tensor {bias.name} (lora_bias) needs base tensor {module}.bias, which the "
                        "base lacks (PEFT cannot merge this adapter either)")
        return
    base_shape = targets.base.tensors[target][1].shape
    if bias.shape != base_shape:
        problems.append(f"adapter tensor {bias.name} has shape {list(bias.shape)} but base tensor {target} "
                        f"has {list(base_shape)}")
        return
    updates.setdefault(target, _Update()).bias_delta = (bias.name, scale)


@contextlib.contextmanager
def _one_torch_thread():
    """Each operation of the merge streams one tensor through memory once: more threads barely speed it up,
    and every parallel operation waits at a barrier for all of them. torch starts one thread per core of the
    node, not of the Job's CPU limit, so under a quota or beside other work the barriers cost more than the
    arithmetic: the 799 MB benchmark merge took 17 s with 2 threads on 2 busy cores, 2-4 s with one.
    B @ A is the same bit for bit whatever the thread count (tests/test_lora_merge.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Scratch:
    """Buffers reused for every tensor of the merge.

    Memory stays at a few tensors' worth for the whole run instead of growing with allocator
    fragmentation, and the pages are faulted in once rather than once per tensor.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._turn = 0

    def weight(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """One of two buffers in turn: the writer may still be writing the previous tensor from the other."""
        self._turn ^= 1
        return self.tensor(f"weight{self._turn}", shape, dtype)

    def tensor(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[role, dtype] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


class _TensorReader:
    """Reads single tensors of one safetensors file; `close` or the context closes it."""

    def __init__(self, header: FileHeader) -> None:
        self.header = header
        self.entries = header.by_name()
        self._file = open(header.path, "rb")  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> _TensorReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def fileno(self) -> int:
        return self._file.fileno()

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, in `out` when given (its shape and dtype must match), else in a new buffer."""
        entry = self.entries[name]
        if out is None:
            out = torch.empty(entry.shape, dtype=FLOAT_DTYPES[entry.dtype])
        self._file.seek(self.header.data_start + entry.start)
        if entry.nbytes and self._file.readinto(_bytes_of(out)) != entry.nbytes:
            raise ConfigError(f"{self.header.path} ended while reading {name!r}: it changed during the merge")
        return out


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    # A uint8 view of a contiguous tensor exposes its memory to file I/O without a copy.
    return tensor.reshape(-1).view(torch.uint8).numpy().data


class _Writer:
    """Appends to the output shards from a thread of its own, in the order asked, while the caller computes
    the next tensor: copying into the page cache overlaps the arithmetic (the Job has two CPUs: one for
    torch, one for this), and a third thread waits for each shard's fsync while the next shard is written.
    One merged tensor at most waits to be written, so memory grows by one tensor, not by a shard. Leaving
    the context waits for every write and fsync: no file is closed under them."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-writer")
        self._sync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-fsync")
        self._queued: list[Future[Any]] = []
        self._tensor: Future[None] | None = None

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)
            self._sync.shutdown(wait=True)

    def submit(self, call: Callable[..., Any], *args: object) -> Future[Any]:
        future = self._pool.submit(call, *args)
        self._queued.append(future)
        return future

    def write_tensor(self, fd: int, tensor: torch.Tensor, entry: TensorEntry) -> None:
        data = _bytes_of(tensor.contiguous())
        if data.nbytes != entry.nbytes:
            raise RuntimeError(f"merged {entry.name} has {data.nbytes} bytes, expected {entry.nbytes}")
        if self._tensor is not None:
            self._tensor.result()
        self._tensor = self.submit(write_all, fd, data)

    def finish(self, out: int, src: _TensorReader) -> Future[Future[None]]:
        """After the writes asked so far: fsync `out` in the other thread, then close both files."""
        return self.submit(self._sync.submit, _finish_shard, out, src)

    def wait(self, until: Future[Any] | None = None) -> None:
        """Wait for the writes up to `until` (all when None); raise the first that failed."""
        while self._queued:
            future = self._queued.pop(0)
            future.result()
            if future is until:
                return

    def settle(self) -> None:
        """Wait for every write, failed or not: nothing runs on the files afterwards."""
        for future in self._queued:
            future.exception()


def _write_shard(
    shard: FileHeader,
    dest: Path,
    updates: dict[str, _Update],
    adapter: _TensorReader | None,
    scratch: _Scratch,
    writer: _Writer,
    untie: _Untie | None = None,
) -> Future[Future[None]]:
    """Rewrite one shard with the same layout (plus an untied lm_head at its end); untouched tensors never
    enter Python. Returns the future of the future of its fsync."""
    entries = shard.entries
    if untie is not None:
        source = shard.by_name()[untie.source]
        end = entries[-1].end if entries else 0
        entries = (*entries, dataclasses.replace(source, name=OUTPUT_EMBEDDING, start=end, end=end + source.nbytes))
    src = _TensorReader(shard)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except BaseException:
        src.close()
        raise
    try:
        writer.submit(write_all, out, encode_header(entries, SHARD_METADATA))
        for entry in shard.entries:
            update = updates.get(entry.name)
            if update is None or adapter is None:
                writer.submit(copy_range, src.fileno(), out, shard.data_start + entry.start, entry.nbytes)
                continue
            writer.write_tensor(out, _merged(src, entry, update, adapter, scratch), entry)
        if untie is not None:
            source = shard.by_name()[untie.source]
            if adapter is None or untie.update == _Update():
                writer.submit(copy_range, src.fileno(), out, shard.data_start + source.start, source.nbytes)
            else:
                writer.write_tensor(out, _merged(src, source, untie.update, adapter, scratch), source)
    except BaseException:
        writer.settle()
        os.close(out)
        src.close()
        raise
    return writer.finish(out, src)


def _finish_shard(out: int, src: _TensorReader) -> None:
    try:
        os.fsync(out)
    finally:
        os.close(out)
        src.close()


def _merged(
    src: _TensorReader, entry: TensorEntry, update: _Update, adapter: _TensorReader, scratch: _Scratch
) -> torch.Tensor:
    """The merged values of one base tensor, in its dtype, with PEFT's operations in PEFT's order."""
    dtype = FLOAT_DTYPES[entry.dtype]
    if update.replacement is not None:
        weight = adapter.read(update.replacement).to(dtype)
    else:
        # Read into a reused buffer and update it in place: no allocation, one pass less per tensor.
        weight = src.read(entry.name, scratch.weight(entry.shape, dtype))
    if update.lora is not None:
        a_key, b_key, scale, transpose = update.lora
        a, b = adapter.read(a_key), adapter.read(b_key)
        compute = torch.promote_types(a.dtype, torch.float32)
        # peft's get_delta_weight: (B @ A), transposed for fan_in_fan_out and embeddings, times scaling.
        delta = scratch.tensor("delta", (b.shape[0], a.shape[1]), compute)
        torch.matmul(b.to(compute), a.to(compute), out=delta)
        if transpose:
            delta = delta.T
        delta *= scale
        _add_into(weight, delta, scratch)
    if update.bias_delta is not None:
        key, scale = update.bias_delta
        weight += adapter.read(key) * scale
    return weight


# Elements widened at a time: 1 MiB of float32 stays in the core's cache between the three passes (1.4 ms
# per 2.9M-element tensor, against 1.9 ms widening it whole), and the buffer stays 1 MiB whatever the tensor.
ADD_CHUNK = 1 << 18


def _add_into(weight: torch.Tensor, delta: torch.Tensor, scratch: _Scratch | None = None) -> None:
    """peft's merge, `weight.data += delta`: the sum in the promoted dtype (float32 for a bf16/fp16 weight),
    rounded once to the weight's dtype. `delta` is scratch: it may hold the sum afterwards."""
    mixed = weight.dtype != delta.dtype and torch.promote_types(weight.dtype, delta.dtype) == delta.dtype
    if mixed and delta.is_contiguous() and weight.is_contiguous():
        # The same sum, operands in the same order, rounded once by the copy back: each chunk of the weight is
        # widened exactly into float32 first, so every pass is a vectorised same-dtype one. torch's
        # mixed-dtype add converts element by element: in place it was most of a bf16 merge's time, and even
        # into the float32 delta it costs twice these passes. A transposed delta (embeddings,
        # fan_in_fan_out) keeps torch's own add: its strided rounding writes NaN differently.
        flat_weight, flat_delta = weight.view(-1), delta.view(-1)
        count = flat_weight.numel()
        size = min(ADD_CHUNK, count)
        widened = scratch.tensor("widened", (size,), delta.dtype) if scratch else torch.empty(size, dtype=delta.dtype)
        for start in range(0, count, ADD_CHUNK):
            part, update = flat_weight[start:start + ADD_CHUNK], flat_delta[start:start + ADD_CHUNK]
            buffer = widened[:part.numel()]
            buffer.copy_(part)
            torch.add(buffer, update, out=update)
            part.copy_(update)
    else:
        weight += delta


def _write_index(base: BaseModel, out_dir: Path, untie: _Untie | None) -> None:
    assert base.index is not None
    metadata = dict(base.index.get("metadata") or {})
    weight_map = dict(base.index["weight_map"])
    metadata["total_size"] = sum(shard.data_bytes for shard in base.shards)
    if untie is not None:
        weight_map[OUTPUT_EMBEDDING] = untie.shard
        metadata["total_size"] += base.tensors[untie.source][1].nbytes
    index = {"metadata": metadata, "weight_map": weight_map}
    dest = out_dir / "model.safetensors.index.json"
    with open(dest, "x", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _main_dtype(base: BaseModel) -> str:
    sizes: dict[str, int] = {}
    for shard in base.shards:
        for entry in shard.entries:
            sizes[entry.dtype] = sizes.get(entry.dtype, 0) + entry.nbytes
    code = max(sizes, key=sizes.__getitem__) if sizes else "F32"
    return str(FLOAT_DTYPES[code]).removeprefix("torch.") if code in FLOAT_DTYPES else code
