"""`python -m entrypoint check`: what `train` would do, without doing it."""

from __future__ import annotations

import json
from pathlib import Path

from entrypoint import datasets, token_lengths
from entrypoint.decisions import Action, decide
from entrypoint.errors import ConfigError
from entrypoint.plan import build_plan
from entrypoint.settings import Settings, check_topology


def run(settings: Settings) -> int:
    check_topology(settings)
    plan = build_plan(settings)
    decision = decide(plan)
    lengths = None
    if decision.action is not Action.SKIP:
        datasets.validate(plan.data, Path(settings.dataset_path))
        datasets.checked_eval(settings)
        lengths = token_lengths.measure(plan)  # what CUTOFF_LEN should cover
    print(json.dumps({
        "decision": decision.action.value,
        "reason": decision.reason,
        "fingerprint": plan.fingerprint,
        "output": str(plan.output),
        "node": {"rank": settings.node_rank, "nnodes": settings.nnodes,
                 "master": f"{settings.master_addr}:{settings.master_port}" if settings.nnodes > 1 else None},
        "llamafactory_args": plan.lf_args,
        "token_lengths": lengths,
    }, indent=2, default=str))
    if decision.action is Action.REFUSE:
        raise ConfigError(f"LORA_OUTPUT_PATH={str(plan.output)!r}: {decision.reason}")
    return 0
