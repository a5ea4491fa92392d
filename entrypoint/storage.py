"""The storage protocol that train and merge share, written for NFS.

- Atomic small files: write a temporary file in the same directory, fsync, rename, fsync the directory.
- One writer per output: a lock file created with O_CREAT|O_EXCL (reliable on NFSv3+, unlike
  flock/fcntl), holding its owner and an expiry that a heartbeat renews. A lock whose expiry has passed
  belongs to a dead holder and is taken over; the takeover renames the stale file away first, so two
  contenders cannot both win.
- Completion marker written last, with the fingerprint inside: present means complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoint.errors import TemporaryFailure
from entrypoint.files import atomic_write_json, fsync_dir, read_json, sizes_problem

log = logging.getLogger("entrypoint")

STATE_DIR = ".job"  # our bookkeeping inside an output directory
MARKER = "COMPLETE.json"
TAKEOVER_GUARD_TTL = 30.0
RUN_FILE = "run.json"


def state_dir(output: Path) -> Path:
    return output / STATE_DIR


def read_marker(output: Path) -> dict[str, Any] | None:
    return read_json(state_dir(output) / MARKER)


def write_marker(output: Path, data: dict[str, Any]) -> None:
    atomic_write_json(state_dir(output) / MARKER, data)


CHECKPOINT_RECORD = ".complete.json"  # inside each checkpoint-N, written once every file of it is saved


def write_checkpoint_record(checkpoint: Path) -> None:
    """Record a checkpoint as complete, with the size of each of its files: a torn file (a kill while the
    optimizer state was written, a truncated copy) makes the checkpoint incomplete, and resume skips it."""
    files = {p.name: p.stat().st_size for p in sorted(checkpoint.iterdir()) if p.is_file()
             and p.name != CHECKPOINT_RECORD}
    atomic_write_json(checkpoint / CHECKPOINT_RECORD, {"files": files, "written_at": time.time()})


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete."""
    return sizes_problem(checkpoint, CHECKPOINT_RECORD)


def owner_id(pod_name: str = "") -> str:
    """Who holds a lock: the pod (POD_NAME from the downward API) or, outside a pod, the host; and the process."""
    return f"{pod_name or socket.gethostname()}:{os.getpid()}"


@dataclass
class LockInfo:
    owner: str
    token: str
    expires_at: float

    @classmethod
    def parse(cls, data: dict[str, Any] | None) -> LockInfo | None:
        try:
            return cls(str(data["owner"]), str(data["token"]), float(data["expires_at"]))  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            return None


@dataclass(frozen=True)
class LockToken:
    """Whether a lock is still ours, checked from its file: what a training process (this one, or a rank
    started by torchrun) asks before it saves anything, so that a run that lost its lock writes nothing more."""

    path: str
    token: str

    def holder(self) -> LockInfo | None:
        return LockInfo.parse(read_json(Path(self.path)))

    def check(self) -> None:
        info = self.holder()
        if info is None or info.token != self.token:
            who = info.owner if info else "nobody (the lock file is gone)"
            raise TemporaryFailure(f"this run lost the output lock {self.path} (now held by {who}): stopped "
                                   "without writing anything more; the Job retries and decides again")


class OutputLock:
    """Exclusive, expiring lock on one output, kept alive by a heartbeat thread while held."""

    def __init__(self, path: Path, ttl: float, owner: str | None = None) -> None:
        self.path = path
        self.ttl = ttl
        self.owner = owner or owner_id()
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()

    def _payload(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "token": self.token, "acquired_at": now, "expires_at": now + self.ttl,
                "host": socket.gethostname(), "pid": os.getpid()}

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self._payload(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(self.path.parent)
        return True

    def holder(self) -> LockInfo | None:
        return LockInfo.parse(read_json(self.path))

    @property
    def token_check(self) -> LockToken:
        return LockToken(str(self.path), self.token)

    def _stale_signature(self) -> str | None:
        """An identity of the current lock file if it is stale (expired, or unreadable and old)."""
        info = self.holder()
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if info is None:
            return f"unreadable@{mtime}" if time.time() - mtime >= self.ttl else None
        if info.expires_at <= time.time() or _dead_on_this_host(read_json(self.path)):
            return info.token
        return None

    def _take_over_if_stale(self) -> None:
        """Remove a dead holder's lock. A second O_EXCL file serialises the takeover, so a contender
        that judged the old lock stale can never remove the fresh lock another contender just made."""
        signature = self._stale_signature()
        if signature is None:
            return
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > TAKEOVER_GUARD_TTL:
                    guard.unlink()  # a contender died mid-takeover
            return
        os.close(fd)
        try:
            if self._stale_signature() == signature:
                info = self.holder()
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                fsync_dir(self.path.parent)
                why = "expired" if info is None or info.expires_at <= time.time() else "held by a process that is gone"
                log.warning("took over the lock %s (%s; holder %s)", self.path, why, info.owner if info else "unknown")
        finally:
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()

    def acquire(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        announced = False
        while True:
            if self._try_create():
                self._start_heartbeat()
                return
            self._take_over_if_stale()
            if self._try_create():
                self._start_heartbeat()
                return
            info = self.holder()
            if not announced and info is not None and wait > 0:
                log.info("%s is held by %s; its lock expires %.0fs after that run's last heartbeat (the lock TTL "
                         "that run was started with: this run's LOCK_TTL_SECONDS applies only to its own lock); "
                         "waiting up to %.0fs (LOCK_WAIT_SECONDS)", self.path.parent, info.owner,
                         max(0.0, info.expires_at - time.time()), wait)
                announced = True
            if time.monotonic() >= deadline:
                who = f"{info.owner}, expires in {max(0, info.expires_at - time.time()):.0f}s" if info else "?"
                raise TemporaryFailure(
                    f"{self.path.parent} is being written by another run ({who}); waited {wait:.0f}s "
                    "(LOCK_WAIT_SECONDS). A retry will continue once that run ends or its lock expires."
                )
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        interval = max(1.0, self.ttl / 4)
        while not self._stop.wait(interval):
            info = self.holder()
            if info is None or info.token != self.token:
                log.error("lost the lock %s to %s", self.path, info.owner if info else "nobody")
                self.lost.set()
                return
            try:
                atomic_write_json(self.path, self._payload())
            except OSError as exc:
                log.warning("could not renew the lock %s: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        info = self.holder()
        if info is not None and info.token == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            fsync_dir(self.path.parent)

    @contextlib.contextmanager
    def held(self, wait: float) -> Iterator[OutputLock]:
        self.acquire(wait)
        try:
            yield self
        finally:
            self.release()


def _dead_on_this_host(data: dict[str, Any] | None) -> bool:
    """A holder on this very host whose process is gone (killed -9 locally): no need to wait for expiry.
    Pods have host names of their own, so this never judges another pod's lock."""
    if not data or data.get("host") != socket.gethostname() or not isinstance(data.get("pid"), int):
        return False
    try:
        os.kill(data["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lock_path_for(output: Path) -> Path:
    """The lock lives beside the output, so the output itself can be moved aside while locked."""
    return output.with_name(f".{output.name}.lock")


def failure_path_for(output: Path) -> Path:
    """Beside the output, like the lock: a run refused before writing anything leaves the output untouched."""
    return output.with_name(f".{output.name}.failed.json")


def record_failure(output: Path, code: int, message: str, job_name: str) -> None:
    """Training ended in a way no retry can fix: the merge that waits for this output stops waiting."""
    if not output.parent.is_dir():
        return  # nothing was ever written here, and no merge can be waiting for it
    try:
        atomic_write_json(failure_path_for(output), {"exit_code": code, "message": message, "job_name": job_name,
                                                     "failed_at": time.time()})
    except OSError as exc:
        log.warning("could not record the failure beside %s: %s", output, exc)


def clear_failure(output: Path) -> None:
    failure_path_for(output).unlink(missing_ok=True)


def read_failure(output: Path) -> dict[str, Any] | None:
    return read_json(failure_path_for(output))


def move_aside(path: Path) -> Path:
    """Rename an existing output to <path>.replaced-<UTC time>; nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
    os.rename(path, target)
    fsync_dir(path.parent)
    return target
