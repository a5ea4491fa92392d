"""`python -m entrypoint probe` run for real, as the pod runs it (UID 10001), on a local tree laid out like /storage:
a healthy tree with a real MLflow server passes; a read-only output directory, an unreachable MLflow, a missing
model or dataset each give their ✗ line and fix, exit 78, and leave no file behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import MlflowServer, Storage, free_port

from entrypoint.probe import Check, parse_lines

POD_UID = 10001


def as_pod_user(argv: list[str]) -> list[str]:
    """The command as the pods' UID and GID. As root (CI), permission bits do not bind, so it runs in a user
    namespace where this user is 10001 (files of the tree then belong to 10001 there, and their mode decides);
    any other user is already bound by them."""
    if os.geteuid() != 0:
        return argv
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to run the probe as UID 10001 as root"
    return [unshare, "--user", f"--map-user={POD_UID}", f"--map-group={POD_UID}", *argv]


def probe(storage: Storage, **env: str) -> tuple[int, list[Check], str]:
    result = subprocess.run(as_pod_user([sys.executable, "-m", "entrypoint", "probe"]), env=storage.env(**env),
                            capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, parse_lines(result.stdout.splitlines()), result.stdout + result.stderr


def by_title(checks: list[Check]) -> dict[str, Check]:
    return {c.title: c for c in checks}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".llama-probe-*")]


def test_a_healthy_tree_with_a_live_mlflow_passes(storage: Storage, mlflow_server: MlflowServer) -> None:
    (storage.root / "output").mkdir()
    code, checks, out = probe(storage, TRACKING="mlflow", MLFLOW_TRACKING_URI=mlflow_server.uri)
    assert code == 0, out
    uid, gid = (POD_UID, POD_UID) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    assert [c.status for c in checks] == ["ok"] * 6, out
    found = by_title(checks)
    # Where training, the merge and the WebUI write: each written, read back and deleted as the pods' user.
    for place, names in ((storage.root / "output", "LORA_OUTPUT_PATH"),
                         (storage.root / "models", "MERGED_MODEL_PATH's directory"), (storage.root, "WEBUI_WORKDIR")):
        assert found[f"storage {place}"].detail == (f"UID {uid} GID {gid} writes, reads and deletes files there "
                                                    f"({names})")
    assert found[f"base model {storage.base}"].detail.startswith("llama model, 1 safetensors file(s)")
    assert found["dataset train_data"].detail.startswith(f"found in {storage.data}: {storage.data}/train_data.json")
    assert found[f"MLflow {mlflow_server.uri}"].detail == "answered within 5s (MLFLOW_TIMEOUT_SECONDS)"
    assert "probe: all 6 checks passed" in out
    assert leftovers(storage.root) == []


def test_a_read_only_output_and_an_unreachable_mlflow_are_named_with_their_fixes(storage: Storage) -> None:
    output = storage.root / "output"
    output.mkdir()
    output.chmod(0o555)
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        code, checks, out = probe(storage, TRACKING="mlflow", MLFLOW_TRACKING_URI=dead, MLFLOW_TIMEOUT_SECONDS="2")
    finally:
        output.chmod(0o755)
    assert code == 78, out
    found = by_title(checks)
    storage_check = found[f"storage {output}"]
    assert storage_check.status == "fail"
    assert "cannot create a file there (Permission denied; it is owned by" in storage_check.detail
    assert "mode 555); written through LORA_OUTPUT_PATH" in storage_check.detail
    assert storage_check.fix.startswith("make it writable by UID 10001: `invoke prepare-storage --env=<env>`")
    assert found[f"storage {storage.root / 'models'}"].status == "ok"  # the merge's directory is still writable
    mlflow = found[f"MLflow {dead}"]
    assert mlflow.status == "fail" and f"MLflow at {dead} is unreachable" in mlflow.detail
    assert "patches/networkpolicy.mlflow-server.yaml" in mlflow.fix
    assert f"probe: 2 check(s) failed: storage {output}, MLflow {dead}" in out
    termination = (storage.root / "termination-log").read_text()
    assert termination.startswith("exit 78: probe: 2 check(s) failed")
    assert leftovers(storage.root) == []


def test_a_missing_model_and_dataset_are_named(storage: Storage, tmp_path: Path) -> None:
    code, checks, out = probe(storage, BASE_MODEL_PATH=str(tmp_path / "no-model"), DATASET="no_such_data")
    assert code == 78, out
    found = by_title(checks)
    model = found[f"base model {tmp_path / 'no-model'}"]
    assert model.status == "fail" and "does not exist or is not a directory" in model.detail
    assert "BASE_MODEL_PATH" in model.fix
    data = found["dataset no_such_data"]
    assert data.status == "fail" and "DATASET='no_such_data' is not in" in data.detail
    assert found["MLflow"].status == "unknown" and found["MLflow"].detail.startswith("TRACKING=none")


def test_lines_read_back_as_the_checks_they_print() -> None:
    checks = [Check("ok", "storage /storage", "writable"), Check("fail", "MLflow http://m:5000", "down: refused",
                                                                 "fix the URI"), Check("unknown", "MLflow", "off")]
    log = ["2026-01-02 03:04:05 INFO entrypoint: noise", *[line for c in checks for line in c.lines()], "error: x"]
    assert parse_lines(log) == checks
