"""The publish gate's checks that run the model (gate.py holds the streamed ones and calls these last).

- probe: on up to PROBE_PROMPTS prompts (EVAL_DATASET's first records when it is set, else the training
  data's), rendered by the published chat template, each of the merged model's first PROBE_COMPARE_TOKENS
  greedy tokens is base + adapter's (PEFT's PeftModel) greedy choice at that position. The reference is
  teacher-forced: one forward pass of base + adapter over the prompt and the merged model's tokens, so it
  costs one prefill per prompt, not a second generation. Where base + adapter ranks the merged model's token
  within TIE_NATS of its own first choice, the position is a near tie (a merged bf16 weight and base +
  low-rank product round differently): counted in the report, not failed.
- stops: each greedy generation (the published stop tokens; no sampling, no penalties) reaches a stop token
  within PUBLISH_GATE_PROBE_TOKENS new tokens. The generations share PUBLISH_GATE_PROBE_SECONDS; a prompt
  that budget cuts short is "not verified", and a check with any such prompt and no failure is skipped,
  never passed or failed, and says so.
- eval_loss (when PUBLISH_GATE_MAX_EVAL_LOSS is set): the merged model's mean loss per response token on
  the first PUBLISH_GATE_EVAL_RECORDS records of EVAL_DATASET (as training computes it: the prompt masked,
  CUTOFF_LEN applied) is at most the bound, or at most the base model's on the same tokens (`base`).

Memory: one model at a time: the merged one, freed, then base + adapter (whose disabled adapter gives the
base's loss), plus the logits of one record's response.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from entrypoint.companions import GENERATION_CONFIG
from entrypoint.gate import Check

PROBE_COMPARE_TOKENS = 16
TIE_NATS = 0.1  # log-probability gap under base + adapter below which two tokens count as tied
IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Example:
    """A record as chat messages up to the user's last turn, and the assistant's answer when it has one."""

    messages: list[dict[str, str]]
    response: list[dict[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """What the model-running checks are given, besides the directories."""

    prompts: tuple[Example, ...]
    eval_records: tuple[Example, ...]  # empty without a loss bar
    max_eval_loss: str  # "" (no bar), "base", or a number
    probe_tokens: int
    probe_seconds: float
    cutoff_len: int


def model_checks(model_dir: Path, base_dir: Path, adapter: Path | None, dtype: Any, run: ModelRun) -> list[Check]:
    """probe, stops and, with a loss bar, eval_loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stop_ids = _stop_ids(model_dir, tokenizer)
    # A prompt longer than training's CUTOFF_LEN is not probed: the model never saw one. Generation stops at
    # the model's last position (some position embeddings end there).
    positions = _max_positions(model_dir)
    limit = min(run.cutoff_len, positions - 1)
    encoded = [(example, _encode(tokenizer, example.messages, add_generation_prompt=True)) for example in run.prompts]
    examples = [example for example, ids in encoded if len(ids) <= limit]
    prompts = [ids for _, ids in encoded if len(ids) <= limit]
    scored = [_labelled(tokenizer, example, run.cutoff_len) for example in run.eval_records]
    usable = [s for s in scored if s is not None]

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=True).eval()

    with torch.inference_mode():
        model = load(model_dir)
        generated, seconds = _generate(model, prompts, stop_ids, tokenizer, run, positions)
        merged_loss = _loss(model, usable) if usable else None
        del model
        gc.collect()  # one model at a time: the merged one is gone before the base is loaded
        reference = None
        base_loss = None
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(load(base_dir), adapter).eval()
            reference = [_teacher_forced(model, ids, tokens[:PROBE_COMPARE_TOKENS])
                         for ids, tokens in zip(prompts, generated, strict=True)]
            if usable and run.max_eval_loss == "base":
                with model.disable_adapter():
                    base_loss = _loss(model, usable)
            del model
            gc.collect()
        elif usable and run.max_eval_loss == "base":
            model = load(base_dir)
            base_loss = _loss(model, usable)
            del model
            gc.collect()

    samples = [{"prompt": example.messages[-1]["content"][:200],
                "output": tokenizer.decode(tokens, skip_special_tokens=False), "tokens": len(tokens),
                "stopped_at": next((i for i, t in enumerate(tokens) if t in stop_ids), None)}
               for example, tokens in zip(examples, generated, strict=True)]
    if samples:
        checks = [_probe(samples, generated, reference, tokenizer), _stops(samples, stop_ids, seconds, run)]
    else:
        why = (f"each of the {len(encoded)} probe prompt(s) is longer than {limit} tokens (CUTOFF_LEN, or the "
               "model's positions)" if encoded else "no probe prompt")
        checks = [Check("probe", "skipped", why), Check("stops", "skipped", why)]
    if run.max_eval_loss:
        checks.append(_eval_loss(merged_loss, base_loss, len(usable), len(scored), run))
    return checks


# ---- inputs ------------------------------------------------------------------------------------------------

def _encode(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(encoded["input_ids"]) if isinstance(encoded, Mapping) else list(encoded)


def _labelled(tokenizer: Any, example: Example, cutoff_len: int) -> tuple[list[int], list[int]] | None:
    """(ids, labels) of prompt + response, the prompt masked as in supervised fine-tuning; None when the
    record has no response or the template renders the prompt differently once the answer follows it."""
    if not example.response:
        return None
    prompt = _encode(tokenizer, example.messages, add_generation_prompt=True)
    full = _encode(tokenizer, example.messages + example.response)
    if full[:len(prompt)] != prompt or len(full) == len(prompt):
        return None
    labels = [IGNORE] * len(prompt) + full[len(prompt):]
    ids, labels = full[:cutoff_len], labels[:cutoff_len]
    return (ids, labels) if any(label != IGNORE for label in labels[1:]) else None


def _max_positions(model_dir: Path) -> int:
    from entrypoint.files import read_json

    config = read_json(model_dir / "config.json") or {}
    value = config.get("max_position_embeddings") or config.get("n_positions")
    return int(value) if isinstance(value, int) and value > 0 else 1 << 30


def _stop_ids(model_dir: Path, tokenizer: Any) -> set[int]:
    """The token ids generation stops at: generation_config.json's eos_token_id, else the tokenizer's EOS."""
    from entrypoint.files import read_json

    raw = (read_json(model_dir / GENERATION_CONFIG) or {}).get("eos_token_id")
    if raw is None:
        raw = tokenizer.eos_token_id
    return {raw} if isinstance(raw, int) else {int(i) for i in raw or ()}


# ---- running the models ----------------------------------------------------------------------------------

def _generate(model: Any, prompts: Sequence[list[int]], stop_ids: set[int], tokenizer: Any, run: ModelRun,
              positions: int) -> tuple[list[list[int]], float]:
    """Greedy tokens for each prompt within the shared time budget (every prompt gets at least one step, so
    the probe always has something to compare); the seconds spent."""
    import torch
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids, default=0)
    started = time.monotonic()
    outputs = []
    for ids in prompts:
        left = max(run.probe_seconds - (time.monotonic() - started), 0.001)
        config = GenerationConfig(do_sample=False, max_new_tokens=min(run.probe_tokens, positions - len(ids)),
                                  max_time=left,
                                  eos_token_id=sorted(stop_ids), pad_token_id=pad)
        prompt = torch.tensor([ids])
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        outputs.append(out[0, len(ids):].tolist())
    return outputs, time.monotonic() - started


def _teacher_forced(model: Any, prompt: list[int], tokens: list[int]) -> list[tuple[int, float]]:
    """For each of tokens: the model's first choice at that position, given the prompt and the tokens before
    it, and how far (in log-probability) the given token is below that choice."""
    import torch

    if not tokens:
        return []
    ids = torch.tensor([prompt + tokens])
    logits = model(input_ids=ids, logits_to_keep=len(tokens) + 1).logits[0, :len(tokens)].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    best = logprobs.argmax(dim=-1)
    gaps = logprobs.gather(1, best[:, None])[:, 0] - logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]
    return [(int(b), float(g)) for b, g in zip(best, gaps, strict=True)]


def _loss(model: Any, records: Sequence[tuple[list[int], list[int]]]) -> float:
    """Mean cross-entropy per labelled token over the records (one record's logits in memory at a time)."""
    import torch

    total, count = 0.0, 0
    for ids, labels in records:
        first = next(i for i, label in enumerate(labels) if i > 0 and label != IGNORE)
        keep = len(ids) - first + 1  # the logits of positions first-1 .. end predict tokens first .. end
        logits = model(input_ids=torch.tensor([ids]), logits_to_keep=keep).logits[0, :-1].float()
        targets = torch.tensor(labels[first:])
        mask = targets != IGNORE
        losses = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
        total += float(losses)
        count += int(mask.sum())
    return total / count


# ---- the checks ------------------------------------------------------------------------------------------

def _probe(samples: list[dict[str, Any]], generated: list[list[int]], reference: list[Any] | None,
           tokenizer: Any) -> Check:
    data = {"prompts": samples, "compare_tokens": PROBE_COMPARE_TOKENS, "tie_nats": TIE_NATS}
    if reference is None:
        return Check("probe", "skipped", "a full fine-tune: no base + adapter to compare with", data)
    problems = []
    ties = 0
    for number, (sample, tokens, choices) in enumerate(zip(samples, generated, reference, strict=True), start=1):
        sample["compared"] = len(choices)
        sample["near_ties"] = sum(1 for (best, gap), token in zip(choices, tokens, strict=False)
                                  if best != token and gap <= TIE_NATS)
        ties += sample["near_ties"]
        differ = next((i for i, ((best, gap), token) in enumerate(zip(choices, tokens, strict=False))
                       if best != token and gap > TIE_NATS), None)
        sample["first_difference"] = differ
        if differ is not None:
            best, gap = choices[differ]
            sample["adapter_choice"] = tokenizer.decode([best], skip_special_tokens=False)
            problems.append(f"prompt {number}: the merged model's greedy token {differ + 1} "
                            f"({tokenizer.decode([tokens[differ]])!r}) is not base+adapter's "
                            f"({sample['adapter_choice']!r}, {gap:.2f} nats apart)")
    if problems:
        return Check("probe", "fail", "; ".join(problems[:3]), data)
    compared = sum(s["compared"] for s in samples)
    tied = f", {ties} of them near ties" if ties else ""
    return Check("probe", "pass", f"{len(samples)} prompt(s): the merged model's {compared} greedy tokens "
                      f"are base+adapter's{tied}", data)


def _stops(samples: list[dict[str, Any]], stop_ids: set[int], seconds: float, run: ModelRun) -> Check:
    data = {"max_new_tokens": run.probe_tokens, "seconds": round(seconds, 3), "seconds_budget": run.probe_seconds,
            "stop_ids": sorted(stop_ids)}
    failed = [n for n, s in enumerate(samples, start=1) if s["stopped_at"] is None and s["tokens"] >= run.probe_tokens]
    cut = [n for n, s in enumerate(samples, start=1) if s["stopped_at"] is None and s["tokens"] < run.probe_tokens]
    for number in cut:
        samples[number - 1]["stop"] = "not verified: PUBLISH_GATE_PROBE_SECONDS or the model's positions ran out"
    data["not_verified"] = cut
    if failed:
        return Check("stops", "fail", f"prompt(s) {', '.join(map(str, failed))}: no stop token "
                          f"{sorted(stop_ids)} within PUBLISH_GATE_PROBE_TOKENS={run.probe_tokens} new tokens", data)
    if cut:
        return Check("stops", "skipped", f"not verified for prompt(s) {', '.join(map(str, cut))}: "
                          f"PUBLISH_GATE_PROBE_SECONDS={run.probe_seconds:g} (or the model's positions) ran out "
                          f"before a stop token or {run.probe_tokens} tokens (raise it, or lower "
                          "PUBLISH_GATE_PROBE_TOKENS)", data)
    longest = max((s["stopped_at"] + 1 for s in samples), default=0)
    return Check("stops", "pass", f"{len(samples)} prompt(s) stop within {longest} of "
                      f"{run.probe_tokens} new tokens", data)


def _eval_loss(merged: float | None, base: float | None, used: int, read: int, run: ModelRun) -> Check:
    data = {"records": used, "records_read": read, "loss": merged, "base_loss": base, "bar": run.max_eval_loss}
    if merged is None:
        return Check("eval_loss", "fail", f"none of the {read} EVAL_DATASET record(s) read has a response "
                          "the chat template renders after its prompt: nothing to score", data)
    bound = base if run.max_eval_loss == "base" else float(run.max_eval_loss)
    what = "the base model's" if run.max_eval_loss == "base" else "PUBLISH_GATE_MAX_EVAL_LOSS"
    assert bound is not None
    if math.isnan(merged) or merged > bound:
        return Check("eval_loss", "fail", f"loss {merged:.4f} on {used} EVAL_DATASET record(s) is above "
                          f"{what} {bound:.4f}", data)
    return Check("eval_loss", "pass", f"loss {merged:.4f} on {used} EVAL_DATASET record(s), at most "
                      f"{what} {bound:.4f}", data)
