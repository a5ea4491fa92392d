"""The NFS-safe lock and atomic files that train and merge share."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from entrypoint.errors import TemporaryFailure
from entrypoint.storage import OutputLock, atomic_write_json, lock_path_for, move_aside, read_json


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path):
    target = tmp_path / "state" / "run.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert read_json(target) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["run.json"]


def test_torn_json_reads_as_absent(tmp_path: Path):
    (tmp_path / "m.json").write_text('{"fingerprint": "ab')
    assert read_json(tmp_path / "m.json") is None
    assert read_json(tmp_path / "missing.json") is None


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path):
    path = lock_path_for(tmp_path / "out")
    first = OutputLock(path, ttl=60, owner="pod-a:1")
    first.acquire(wait=0)
    try:
        second = OutputLock(path, ttl=60, owner="pod-b:2")
        with pytest.raises(TemporaryFailure, match="pod-a:1"):
            second.acquire(wait=0.5)
    finally:
        first.release()
    assert not path.exists()
    OutputLock(path, ttl=60).acquire(wait=0)


def test_lock_of_a_dead_holder_is_taken_over_after_expiry(tmp_path: Path):
    path = lock_path_for(tmp_path / "out")
    path.write_text(json.dumps({"owner": "dead-pod:7", "token": "t", "expires_at": time.time() - 1}))
    lock = OutputLock(path, ttl=60, owner="new-pod:1")
    lock.acquire(wait=0)
    assert json.loads(path.read_text())["owner"] == "new-pod:1"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "the stale lock file must be gone"
    lock.release()


def test_a_live_lock_is_not_taken_over(tmp_path: Path):
    path = lock_path_for(tmp_path / "out")
    path.write_text(json.dumps({"owner": "live-pod:7", "token": "t", "expires_at": time.time() + 30}))
    with pytest.raises(TemporaryFailure, match="live-pod:7"):
        OutputLock(path, ttl=60).acquire(wait=0.2)
    assert json.loads(path.read_text())["owner"] == "live-pod:7"


def test_heartbeat_keeps_the_lock_alive_and_notices_a_takeover(tmp_path: Path):
    path = lock_path_for(tmp_path / "out")
    lock = OutputLock(path, ttl=10)  # heartbeat every 2.5 s
    lock.acquire(wait=0)
    first_expiry = json.loads(path.read_text())["expires_at"]
    time.sleep(3)
    assert json.loads(path.read_text())["expires_at"] > first_expiry
    path.write_text(json.dumps({"owner": "thief:1", "token": "other", "expires_at": time.time() + 60}))
    assert lock.lost.wait(timeout=5)
    lock.release()
    assert json.loads(path.read_text())["owner"] == "thief:1", "release must not delete another holder's lock"


def _contend(path: str, queue) -> None:
    lock = OutputLock(Path(path), ttl=60, owner=f"p{os.getpid()}")
    try:
        lock.acquire(wait=0)
        queue.put("won")
        time.sleep(1)
    except TemporaryFailure:
        queue.put("lost")


def test_only_one_of_many_contenders_wins_a_stale_lock(tmp_path: Path):
    path = lock_path_for(tmp_path / "out")
    path.write_text(json.dumps({"owner": "dead", "token": "t", "expires_at": time.time() - 5}))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(path), queue)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    results = sorted(queue.get(timeout=5) for _ in procs)
    assert results.count("won") == 1, results


def test_move_aside_keeps_everything(tmp_path: Path):
    out = tmp_path / "lora-adapter"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"x" * 10)
    moved = move_aside(out)
    assert not out.exists()
    assert moved.name.startswith("lora-adapter.replaced-")
    assert (moved / "adapter_model.safetensors").read_bytes() == b"x" * 10
    out.mkdir()
    assert move_aside(out) != moved
