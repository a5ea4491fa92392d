"""How long the training records are in tokens, as LLaMA-Factory will see them: each record converted by its
own dataset converter, rendered by the chat template (TEMPLATE) and tokenized with the base model's tokenizer.
`python -m entrypoint check` prints the percentiles, so CUTOFF_LEN can be chosen from the data: a record
longer than CUTOFF_LEN loses its end, the answer's last tokens and its stop token included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint import datasets

if TYPE_CHECKING:
    from entrypoint.plan import TrainPlan

log = logging.getLogger("entrypoint")

# Beyond this many records an evenly spaced sample is measured: the percentiles barely move, the wait does.
SAMPLE_LIMIT = 20_000
PERCENTILES = (50, 90, 95, 99)


def _lf_arguments(cls: type, args: dict[str, Any]) -> Any:
    """One of LLaMA-Factory's argument dataclasses from the run's arguments (YAML overrides included)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in args.items() if k in names})


def _records(plan: TrainPlan) -> list[tuple[str, Any]]:
    """(dataset name, record) for what training reads: every dataset, at most MAX_SAMPLES records of each."""
    base = Path("/") if plan.data.generated else Path(plan.settings.dataset_path)
    limit = plan.settings.max_samples
    found: list[tuple[str, Any]] = []
    for name in plan.data.names:
        entry = plan.data.info[name]
        taken = 0
        for path in datasets.entry_files(name, entry, base):
            for _, record in datasets.iter_records(path):
                if limit and taken >= limit:
                    break
                found.append((name, record))
                taken += 1
    return found


def nearest_rank(values: list[int], percent: float) -> int:
    """The smallest value that at least `percent` % of the sorted values do not exceed."""
    return values[max(0, math.ceil(percent / 100 * len(values)) - 1)]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """LLaMA-Factory logs to stdout, where `check` prints its JSON: send the process's stdout to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def measure(plan: TrainPlan) -> dict[str, Any]:
    with _stdout_to_stderr():
        return _measure(plan)


def _measure(plan: TrainPlan) -> dict[str, Any]:
    from llamafactory.data.converter import DATASET_CONVERTERS
    from llamafactory.data.parser import DatasetAttr
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    args = plan.lf_args
    tokenizer = load_tokenizer(_lf_arguments(ModelArguments, args))["tokenizer"]
    data_args = _lf_arguments(DataArguments, args)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    converters = {}
    for name in plan.data.names:
        attr = DatasetAttr("file", dataset_name=name)
        attr.join(plan.data.info[name])
        converters[name] = DATASET_CONVERTERS[attr.formatting](attr, data_args)

    records = _records(plan)
    step = max(1, math.ceil(len(records) / SAMPLE_LIMIT))
    lengths = []
    for name, record in records[::step]:
        example = converters[name](defaultdict(lambda: None, record))  # a column a record lacks reads as None
        messages = example["_prompt"] + example["_response"]
        pairs = template.encode_multiturn(tokenizer, messages, example["_system"], example["_tools"])
        lengths.append(sum(len(source) + len(target) for source, target in pairs) + int(template.efficient_eos))
    lengths.sort()
    cutoff = int(args["cutoff_len"])
    report = {
        "records": len(records),
        "measured": len(lengths),
        **{f"p{p}": nearest_rank(lengths, p) for p in PERCENTILES},
        "max": lengths[-1],
        "cutoff_len": cutoff,
        "longer_than_cutoff": sum(length > cutoff for length in lengths),
        "tokens": sum(lengths),  # of the measured records, before CUTOFF_LEN cuts them
    }
    log.info("token lengths with template %s and the base model's tokenizer (%d of %d records): p50 %d, p90 %d, "
             "p95 %d, p99 %d, max %d; %d longer than CUTOFF_LEN=%d (cut at the end, their stop token included)",
             args.get("template"), report["measured"], report["records"], report["p50"], report["p90"],
             report["p95"], report["p99"], report["max"], report["longer_than_cutoff"], cutoff)
    return report
