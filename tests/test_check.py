"""`python -m entrypoint check`: shows what train would do, changes nothing."""

from __future__ import annotations

import json

from helpers import Storage, run_entrypoint, snapshot

from entrypoint.errors import ExitCode


def test_check_reports_the_plan_and_writes_nothing(storage: Storage):
    before = snapshot(storage.root)
    result = run_entrypoint("check", storage.env(LORA_RANK="4", LLAMAFACTORY_CONFIG=""), timeout=60)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["decision"] == "start"
    assert plan["llamafactory_args"]["lora_rank"] == 4
    assert plan["llamafactory_args"]["model_name_or_path"] == str(storage.base)
    assert snapshot(storage.root) == before


def test_yaml_keys_override_the_environment(storage: Storage):
    (storage.root / "extra.yaml").write_text("lora_rank: 32\nlora_dropout: 0.1\n")
    env = storage.env(LORA_RANK="4", LLAMAFACTORY_CONFIG=str(storage.root / "extra.yaml"))
    plan = json.loads(run_entrypoint("check", env, timeout=60).stdout)
    assert plan["llamafactory_args"]["lora_rank"] == 32 and plan["llamafactory_args"]["lora_dropout"] == 0.1


def test_check_refuses_what_train_would_refuse(storage: Storage):
    storage.output.mkdir(parents=True)
    (storage.output / "notes.txt").write_text("the user's own file")
    result = run_entrypoint("check", storage.env(), timeout=60)
    assert result.returncode == ExitCode.CONFIG
    assert "files this tool did not write" in result.stderr
    assert (storage.output / "notes.txt").read_text() == "the user's own file"
