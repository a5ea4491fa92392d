"""`python -m entrypoint probe`: can a pod of this image, with this configuration, storage and network, train?

`invoke doctor` runs it in a short-lived pod made from the training Job's own pod template (same image, user,
volumes, environment and network policies; no GPU), so the answer comes from the code and the place training
uses, before a GPU node waits for hours. It changes nothing it did not create: each write check creates one
file of its own and deletes it again.

It prints one line per check, `✓` / `✗` / `?`, each `✗` followed by its fix, and exits 0 when nothing failed,
78 otherwise (the one-line reason names the failed checks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from entrypoint import datasets
from entrypoint.errors import ConfigError, EntrypointError
from entrypoint.model_dir import check_trainable_base
from entrypoint.settings import Settings
from entrypoint.tracking import preflight, redact_uri

MARKS = {"ok": "✓", "fail": "✗", "unknown": "?"}
FIX_PREFIX = "    fix: "
# The user the image runs as and the Jobs' securityContext sets (docker/Dockerfile, base/job-train.yaml).
POD_UID = 10001
OWNERSHIP_FIX = (
    "make it writable by UID {uid}: `invoke prepare-storage --env=<env>` (Filestore, or an NFS export without "
    "root squash), or on the NFS server `chown -R {uid}:{uid} <export>`; fsGroup does not apply to NFS or "
    "ReadWriteMany Filestore volumes (README: Storage ownership)"
)


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of a checklist (this probe's, and `invoke doctor`'s): what was checked, how it went, the fix."""

    status: str  # ok | fail | unknown
    title: str
    detail: str
    fix: str = ""

    def lines(self, indent: str = "") -> list[str]:
        text = [f"{indent}{MARKS[self.status]} {self.title}: {self.detail}"]
        if self.fix:
            text.append(f"{indent}{FIX_PREFIX}{self.fix}")
        return text


def parse_lines(lines: Iterable[str]) -> list[Check]:
    """The checks in a log that holds Check.lines() among other lines (what `invoke doctor` reads from the pod)."""
    status_of = {mark: status for status, mark in MARKS.items()}
    found: list[Check] = []
    for line in lines:
        if line.startswith(FIX_PREFIX) and found:
            found[-1] = dataclasses.replace(found[-1], fix=line[len(FIX_PREFIX):])
        elif line[:2] in {f"{mark} " for mark in status_of} and ": " in line:
            title, detail = line[2:].split(": ", 1)
            found.append(Check(status_of[line[0]], title, detail))
    return found


def run(settings: Settings) -> int:
    checks = [*storage_checks(settings), base_model_check(settings), dataset_check(settings),
              tracking_check(settings)]
    for check in checks:
        print("\n".join(check.lines()), flush=True)
    failed = [c.title for c in checks if c.status == "fail"]
    if failed:
        raise ConfigError(f"probe: {len(failed)} check(s) failed: {', '.join(failed)}")
    print(f"probe: all {len(checks)} checks passed", flush=True)
    return 0


def existing_ancestor(path: Path) -> Path:
    """The path itself when it exists, else its nearest existing parent: where its writer will create it."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_places(settings: Settings) -> dict[Path, list[str]]:
    """Each directory a pod writes into, with the settings that make it write there: training's output, the merge's
    versions and symlink beside MERGED_MODEL_PATH, the WebUI's workdir (each the nearest directory that exists)."""
    wanted = {
        "LORA_OUTPUT_PATH": Path(settings.lora_output_path),
        "MERGED_MODEL_PATH's directory": Path(settings.merged_model_path).parent,
        "WEBUI_WORKDIR": Path(settings.webui_workdir),
    }
    places: dict[Path, list[str]] = {}
    for name, path in wanted.items():
        places.setdefault(existing_ancestor(path), []).append(name)
    return places


def storage_checks(settings: Settings) -> list[Check]:
    return [write_check(path, names) for path, names in writable_places(settings).items()]


def write_check(directory: Path, names: list[str]) -> Check:
    """Create, read back and delete a file of our own in `directory`, as this process's user."""
    title = f"storage {directory}"
    uid, gid = os.getuid(), os.getgid()
    who = f"UID {uid} GID {gid}"
    probe = directory / f".llama-probe-{socket.gethostname()}-{os.getpid()}"
    payload = os.urandom(4096)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return Check("fail", title, f"{who} cannot create a file there ({exc.strerror}; {_owner(directory)}); "
                     f"written through {', '.join(names)}", OWNERSHIP_FIX.format(uid=POD_UID))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        read_back = probe.read_bytes()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        return Check("fail", title, f"{who} created a file but could not write or read it ({exc.strerror}): the "
                     "storage is full, read-only or failing", "check the NFS server or Filestore instance")
    try:
        probe.unlink()
    except OSError as exc:
        return Check("fail", title, f"{who} wrote {probe} but cannot delete it ({exc.strerror}; {_owner(directory)})",
                     OWNERSHIP_FIX.format(uid=POD_UID))
    if read_back != payload:
        return Check("fail", title, "a file written there read back different: the storage is not consistent",
                     "check the NFS server and the mount options of the PersistentVolume")
    return Check("ok", title, f"{who} writes, reads and deletes files there ({', '.join(names)})")


def _owner(directory: Path) -> str:
    try:
        info = directory.stat()
    except OSError as exc:
        return f"cannot stat it: {exc.strerror}"
    return f"it is owned by {info.st_uid}:{info.st_gid}, mode {info.st_mode & 0o7777:o}"


def base_model_check(settings: Settings) -> Check:
    title = f"base model {settings.base_model_path}"
    try:
        base = check_trainable_base(Path(settings.base_model_path))
    except (ConfigError, OSError) as exc:
        return Check("fail", title, str(exc), "copy the model there (the guide, section 2.2) or point "
                     "BASE_MODEL_PATH in the overlay's llm-config literals at it")
    size = sum(shard.path.stat().st_size for shard in base.shards) / 2**30
    return Check("ok", title, f"{base.config['model_type']} model, {len(base.shards)} safetensors file(s), "
                 f"{size:.1f} GiB, tokenizer present")


def dataset_check(settings: Settings) -> Check:
    names = ",".join(settings.dataset)
    title = f"dataset {names}"
    try:
        # Nothing is written: the generated dataset_info.json would go to this directory, which is never created.
        found = datasets.resolve(Path(settings.dataset_path), settings.dataset, settings.dataset_format,
                                 generated_dir=Path(tempfile.gettempdir()) / "llama-probe-dataset-info")
    except (ConfigError, OSError) as exc:
        return Check("fail", title, str(exc), "copy the data into DATASET_PATH (the guide, section 3) or set "
                     "DATASET in the overlay's llm-config literals")
    files = ", ".join(sorted(found.files)) or "none"
    return Check("ok", title, f"found in {settings.dataset_path}: {files} (every record is checked when training "
                 "starts)")


def tracking_check(settings: Settings) -> Check:
    if settings.tracking != "mlflow":
        return Check("unknown", "MLflow", "TRACKING=none: not checked, training runs untracked")
    uri = settings.mlflow_tracking_uri
    title = f"MLflow {redact_uri(uri)}"
    fix = ("MLFLOW_TRACKING_URI (overlays/<env>/mlflow.env) must name a server this pod may reach: the overlay's "
           "patches/networkpolicy.mlflow-server.yaml allows it (namespace, pod labels, port)")
    host = urllib.parse.urlsplit(uri).hostname
    timeout = settings.mlflow_timeout_seconds
    if host:
        problem = resolve(host, timeout)
        if problem:
            return Check("fail", title, f"{host} does not resolve: {problem}", "check the host name in "
                         "MLFLOW_TRACKING_URI; DNS is allowed by allow-egress-dns (base/networkpolicy-egress-dns.yaml"
                         "; with Cloud DNS for GKE add 169.254.169.254 there)")
    try:
        preflight(uri, settings.mlflow_experiment_name, timeout)
    except EntrypointError as exc:
        return Check("fail", title, str(exc), fix)
    return Check("ok", title, f"answered within {timeout:g}s (MLFLOW_TIMEOUT_SECONDS)")


def resolve(host: str, timeout: float) -> str | None:
    """Why `host` does not resolve within `timeout` seconds, or None when it does. The resolver has no timeout of
    its own, and blocked DNS makes it retry every search domain: it runs in a thread this call stops waiting for."""
    outcome: list[str | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, None)
            outcome.append(None)
        except OSError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=lookup, name="probe-dns", daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g}s"
