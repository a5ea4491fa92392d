"""`invoke test`, `demo`, `bench`: the local commands, through ./dev.sh and the venv it sets up (.venv).

They shell out, so this side never imports torch, transformers, LLaMA-Factory or MLflow.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from invoke.exceptions import Exit

from k8s_tasks.plan import Command, Plan
from k8s_tasks.tools import REPO

VENV_PYTHON = ".venv/bin/python"


def plan_test(pytest_args: str = "") -> Plan:
    return Plan("run the test suite (what CI runs)", [Command(("./dev.sh", "test", *shlex.split(pytest_args)))])


def plan_demo(storage: str | None = None) -> Plan:
    argv = ("./dev.sh", "demo", *(("--storage", storage) if storage else ()))
    return Plan("run the whole flow locally on a generated tiny model", [Command(argv)])


def plan_bench(root: Path = REPO) -> Plan:
    scripts = sorted(p.relative_to(root) for p in (root / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    if not scripts:
        raise Exit("no benchmarks: benchmarks/*.py is empty")
    steps = [Command(("./dev.sh", "setup")), *(Command((VENV_PYTHON, str(script))) for script in scripts)]
    return Plan(f"run {len(scripts)} benchmark(s)", steps)
