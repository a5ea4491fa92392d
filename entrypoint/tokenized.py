"""Tokenize once: the tokenized dataset is written to the shared storage once and reused by every retry, every
resume, every node and every later run whose tokenization would come out the same.

- Where: `<parent of LORA_OUTPUT_PATH>/.tokenized/<key>`, handed to LLaMA-Factory as `tokenized_path`,
  which then loads it instead of reading and tokenizing the records.
- Key: a digest of everything tokenization reads: the datasets (their dataset_info entries and their files'
  content), the tokenizer (every file of the base model but its weights), the LLaMA-Factory data and model
  arguments (template, cutoff_len, max_samples, packing, train_on_prompt, ...), the stage and the random
  generators' start value, `SEED` (the validation split and dataset mixing use it), and the versions of the
  libraries that tokenize. Training arguments (learning rate, epochs, LoRA rank, ...) are not in it: changing
  them reuses the cache. Anything unknown counts: an argument of LLaMA-Factory's data or model classes is in
  the key unless listed below as not touching the tokens, so a new one costs a re-tokenization, never a stale
  cache.
- Publish: node 0's launcher, holding the output lock, tokenizes into `<output>/.job/tokenizing` (its own,
  emptied first: what a killed attempt left there is never used), records every file with its size, and
  renames the directory to its key, which is atomic on NFS as on a local disk. A rename onto a key another
  run published first fails (the target is not empty): that run's copy is used. A cache is used only with
  its record and every file at the recorded size; a broken one is moved aside and made again.
- Other nodes write nothing: they wait for node 0 to publish before joining its rendezvous.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint.errors import TemporaryFailure
from entrypoint.files import atomic_write_json, fsync_dir, sizes_problem
from entrypoint.fingerprint import digest
from entrypoint.storage import state_dir

if TYPE_CHECKING:
    from entrypoint.plan import TrainPlan

log = logging.getLogger("entrypoint")

CACHE_DIR = ".tokenized"
RECORD = ".complete.json"
WORK_DIR = "tokenizing"
# Data and model arguments that never change the tokens: where things are, how many processes tokenize, and
# the base's path (the tokenizer's files stand for it, by content).
NOT_IN_KEY = {
    "tokenized_path", "dataset_dir", "media_dir", "preprocessing_num_workers", "preprocessing_batch_size",
    "overwrite_cache", "data_shared_file_system", "model_name_or_path", "cache_dir", "hf_hub_token",
    "ms_hub_token", "om_hub_token",
}
# Training arguments that do: the validation split and the mixing of datasets draw random numbers from SEED.
TRAINING_KEYS_IN_KEY = ("stage", "seed", "do_train", "do_eval", "do_predict", "predict_with_generate")
LIBRARIES = ("llamafactory", "transformers", "tokenizers", "datasets")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def cache_root(output: Path) -> Path:
    return output.parent / CACHE_DIR


def key_inputs(lf_args: dict[str, Any], data_identity: dict[str, Any], model_identity: dict[str, str]) -> dict:
    """What the tokenized dataset depends on (needs LLaMA-Factory importable: its argument classes)."""
    from importlib.metadata import version

    from llamafactory.hparams import DataArguments, ModelArguments

    argument_names = {f.name for cls in (DataArguments, ModelArguments) for f in dataclasses.fields(cls)}
    arguments = {k: v for k, v in lf_args.items()
                 if (k in argument_names and k not in NOT_IN_KEY) or k in TRAINING_KEYS_IN_KEY}
    return {
        "arguments": arguments,
        "data": data_identity,
        "tokenizer": {name: ident for name, ident in model_identity.items() if not name.endswith(WEIGHT_SUFFIXES)},
        "libraries": {name: version(name) for name in LIBRARIES},
    }


def cache_path(output: Path, inputs: dict[str, Any]) -> Path:
    return cache_root(output) / digest(inputs)[:32]


def problem(directory: Path) -> str | None:
    """Why a published cache cannot be used, or None when it is complete."""
    return sizes_problem(directory, RECORD)


def ensure(lf_args: dict[str, Any], inputs: dict[str, Any], output: Path, lock_check: Any = None) -> Path:
    """The published cache for these inputs, tokenizing and publishing it first when there is none.

    `lock_check()` raises when this run no longer holds the output lock: such a run publishes nothing."""
    target = cache_path(output, inputs)
    why = problem(target) if target.exists() else None
    if target.exists() and why is None:
        log.info("tokenized dataset: reusing %s", target)
        return target
    if why is not None:
        aside = target.with_name(f"{target.name}.broken-{uuid.uuid4().hex[:8]}")
        log.warning("tokenized dataset %s is not usable (%s): moved to %s, tokenizing again", target, why, aside)
        with contextlib.suppress(FileNotFoundError):  # another run moved it first
            os.rename(target, aside)
    work = state_dir(output) / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)  # a killed attempt's partial write
    started = time.monotonic()
    tokenize(lf_args, work)
    if lock_check is not None:
        lock_check()
    atomic_write_json(work / RECORD, {
        "files": {str(p.relative_to(work)): p.stat().st_size for p in sorted(work.rglob("*")) if p.is_file()},
        "inputs": inputs,
        "written_at": time.time(),
    })
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(work, target)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or problem(target) is not None:
            raise
        shutil.rmtree(work, ignore_errors=True)
        log.info("tokenized dataset: another run published %s first; using it", target)
        return target
    fsync_dir(target.parent)
    log.info("tokenized dataset: published %s in %.1fs", target, time.monotonic() - started)
    return target


def tokenize(lf_args: dict[str, Any], directory: Path) -> None:
    """LLaMA-Factory's own preprocessing, as its SFT workflow runs it, saved to `directory`."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    from entrypoint.worker import resolve_precision

    args = resolve_precision(lf_args)
    args.pop("deepspeed", None)  # accepted only inside a distributed process; tokenization does not use it
    args.pop("resume_from_checkpoint", None)
    args.update(tokenized_path=str(directory), overwrite_output_dir=True)  # no resume probe of the output
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    if not (directory / "dataset_dict.json").is_file():
        raise TemporaryFailure(f"LLaMA-Factory did not save the tokenized dataset to {directory}")


def wait_for(target: Path, timeout: float) -> None:
    """A node other than node 0: wait until node 0 has published the cache (NFS may also hide a new directory
    from another client for up to a minute)."""
    deadline = time.monotonic() + timeout
    announced = False
    while problem(target) is not None:
        if time.monotonic() >= deadline:
            raise TemporaryFailure(f"node 0 did not publish the tokenized dataset {target} within {timeout:.0f}s; "
                                   "the Job retries")
        if not announced:
            log.info("waiting up to %.0fs for node 0 to publish the tokenized dataset %s", timeout, target)
            announced = True
        time.sleep(2.0)


def prepare(plan: TrainPlan, args: dict[str, Any], lock_check: Any = None) -> dict[str, Any]:
    """`args` with `tokenized_path`: node 0 makes sure the cache is published (tokenizing when needed), the
    other nodes wait for it."""
    inputs = key_inputs(args, plan.fingerprint_inputs["data"], plan.fingerprint_inputs["model"])
    if plan.settings.node_rank == 0:
        path = ensure(args, inputs, plan.output, lock_check)
    else:
        path = cache_path(plan.output, inputs)
        wait_for(path, plan.settings.ddp_timeout)
    return {**args, "tokenized_path": str(path)}
