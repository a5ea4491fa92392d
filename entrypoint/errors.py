"""The exit-code contract and the one place that maps failures onto it.

Kubernetes reads the exit code (podFailurePolicy) and the termination log (`kubectl describe`,
`invoke status`); both are written here and nowhere else.
"""

from __future__ import annotations

import enum
import errno
import logging
import re
import sys

log = logging.getLogger("entrypoint")

DEFAULT_TERMINATION_LOG = "/dev/termination-log"


class ExitCode(enum.IntEnum):
    """Documented in README.md ("Exit codes"); the Jobs' podFailurePolicy depends on these values."""

    OK = 0  # done, or skipped because the same work is already complete
    INTERNAL = 1  # unexpected failure: retriable
    TEMPORARY = 75  # a dependency is unavailable for now (MLflow down, output locked): retriable
    CONFIG = 78  # configuration or input error: retrying cannot help, the Job fails at once
    GPU_OUT_OF_MEMORY = 79  # the same configuration runs out of GPU memory again: the Job fails at once
    INTERRUPTED = 143  # stopped by SIGTERM (preemption, pod deletion): retriable, the rerun resumes

    @property
    def meaning(self) -> str:
        """What the code tells a user after a run: the one text the CLI epilog, `invoke status` and the
        README's table show."""
        return EXIT_MEANINGS[self]


# Codes the Jobs' podFailurePolicy does not retry (FailJob): training records them beside its output, so a
# merge waiting for it stops waiting.
TERMINAL_CODES = frozenset({ExitCode.CONFIG, ExitCode.GPU_OUT_OF_MEMORY})

EXIT_MEANINGS = {
    ExitCode.OK: "done, or skipped because the same work was already complete",
    ExitCode.INTERNAL: "unexpected failure (retried up to backoffLimit)",
    ExitCode.TEMPORARY: "a dependency was unavailable (MLflow unreachable, output locked): retried",
    ExitCode.CONFIG: "configuration or input error: retrying cannot help, the Job fails at once",
    ExitCode.GPU_OUT_OF_MEMORY: "out of GPU memory: the same configuration runs out again, the Job fails at once",
    ExitCode.INTERRUPTED: "stopped by SIGTERM after saving a checkpoint: retried, the rerun resumes",
}


class EntrypointError(Exception):
    """A failure with a known cause; its message is shown to the user as is."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(EntrypointError):
    """Bad configuration or input: names what is wrong and what is allowed."""

    exit_code = ExitCode.CONFIG


class TemporaryFailure(EntrypointError):
    """Something outside us is unavailable right now; a retry may succeed."""

    exit_code = ExitCode.TEMPORARY


class Interrupted(EntrypointError):
    """SIGTERM arrived; work stopped at a safe point. `deadline` (time.monotonic) is when the pod must have
    exited: what is left to do on the way out (MLflow) gets only the time before it."""

    exit_code = ExitCode.INTERRUPTED

    def __init__(self, message: str, deadline: float | None = None) -> None:
        super().__init__(message)
        self.deadline = deadline

    def time_left(self, default: float) -> float:
        import time

        return default if self.deadline is None else max(0.5, self.deadline - time.monotonic())


class GpuOutOfMemory(EntrypointError):
    """CUDA ran out of memory: deterministic for an unchanged configuration, so retrying only repeats it."""

    exit_code = ExitCode.GPU_OUT_OF_MEMORY


class PeersLost(EntrypointError):
    """A collective between the training processes failed or timed out (NCCL, gloo, the rendezvous store): a
    process or node was lost or stalled. Retried: the next attempt resumes from the last checkpoint."""


_termination_log = DEFAULT_TERMINATION_LOG


def set_termination_log(path: str) -> None:
    """Where the one-line reason goes (TERMINATION_LOG_PATH, set by the CLI before anything can fail)."""
    global _termination_log
    _termination_log = path or DEFAULT_TERMINATION_LOG


def write_termination_log(message: str, path: str | None = None) -> None:
    """Write a one-line reason where Kubernetes picks it up; never fail because of it."""
    path = path or _termination_log
    line = " ".join(message.split())[:4000]
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(line + "\n")
    except OSError:
        # Outside a pod /dev/termination-log is usually not writable: the log line above is enough.
        log.debug("cannot write termination log %s", path)


def finish(code: ExitCode, message: str) -> int:
    """Report the outcome on stderr and in the termination log, in one line, and return the exit code."""
    message = " ".join(message.split())
    if code == ExitCode.OK:
        log.info(message)
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)
    write_termination_log(message if code == ExitCode.OK else f"exit {int(code)}: {message}")
    return int(code)


# What the storage says, and what it means for a retry: a full or read-only volume, or one this UID may not
# write, stays so (the Job fails at once, naming the path); an NFS server that went away may come back.
_STORAGE_ERRORS = {
    errno.ENOSPC: (ExitCode.CONFIG, "no space left on the storage: free space (MERGE_KEEP_VERSIONS, "
                                    "SAVE_TOTAL_LIMIT and old outputs take space) or use a larger volume"),
    errno.EDQUOT: (ExitCode.CONFIG, "the storage quota is used up: free space or raise the quota"),
    errno.EROFS: (ExitCode.CONFIG, "the storage is mounted read-only: mount it read-write"),
    errno.EACCES: (ExitCode.CONFIG, "permission denied: the pods run as UID 10001, which must be able to write "
                                    "there (README: storage ownership)"),
    errno.EPERM: (ExitCode.CONFIG, "operation not permitted: the pods run as UID 10001, which must own what it "
                                   "writes (README: storage ownership)"),
    errno.ESTALE: (ExitCode.TEMPORARY, "the NFS file handle went stale (the server restarted or the export changed)"),
    errno.EIO: (ExitCode.TEMPORARY, "input/output error on the storage"),
    errno.ETIMEDOUT: (ExitCode.TEMPORARY, "the storage did not answer in time"),
}


# How libraries report the two failures that need their own reason line. torch raises OutOfMemoryError from
# its caching allocator; CUDA itself, cuBLAS and NCCL report allocation failures as plain RuntimeErrors.
_OOM_RE = re.compile(r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED|"
                     r"Cuda failure 'out of memory'")
# NCCL's watchdog and errors; gloo's transport (CPU runs) when a peer's connection closes or times out.
_PEERS_RE = re.compile(r"Watchdog caught collective operation timeout|ProcessGroupNCCL|NCCL communicator|"
                       r"gloo/\S+\] (Connection (closed|reset) by peer|Timed out)")
_DIST_ERRORS = ("DistBackendError", "DistStoreError", "DistNetworkError")
OOM_KNOBS = (
    "lower BATCH_SIZE (and raise GRADIENT_ACCUMULATION to keep the effective batch), lower CUTOFF_LEN, train "
    "with FINETUNING_TYPE=qlora, or shard the model over several GPUs with DEEPSPEED=zero3"
)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or while handling (a library may wrap the original)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _gpu_memory_now() -> str:
    """What this process holds on its GPU, when torch is loaded and sees one (it is not imported for this)."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return ""
        free, total = torch.cuda.mem_get_info()
        gib = 1 << 30
        return (f"; now {free / gib:.2f} of {total / gib:.2f} GiB free on GPU {torch.cuda.current_device()}, "
                f"peak {torch.cuda.max_memory_allocated() / gib:.2f} GiB allocated by PyTorch in this process")
    except Exception:  # a broken CUDA context must not hide the reason itself
        return ""


def oom_reason(exc: BaseException) -> str:
    """torch's own figures (what it tried to allocate, the GPU's capacity, what is free and what PyTorch
    holds), without its advice, then the settings that lower memory."""
    figures = " ".join(str(exc).split())
    figures = re.sub(r"^(torch\.)?(cuda\.)?OutOfMemoryError:\s*", "", figures)
    figures = figures.split(" If reserved but unallocated")[0].split(" If reserved memory is >>")[0]
    figures = figures.split(" See documentation for Memory Management")[0].rstrip(" .")
    return (f"out of GPU memory ({figures}{_gpu_memory_now()}). The same configuration runs out again, so the "
            f"Job is not retried: {OOM_KNOBS}")


def peers_lost_reason(exc: BaseException) -> str:
    return (f"the training processes lost each other ({_first_line(exc)[:400]}): a process or node died or "
            "stalled (preemption, out of memory, a crash: see the other pods' logs), a rank waited longer than "
            "DDP_TIMEOUT (e.g. for rank 0 tokenizing a large dataset: raise it, or tokenize once with "
            "tokenized_path), or the nodes cannot reach each other (NCCL_DEBUG=INFO shows the interface NCCL "
            "picked; NCCL_SOCKET_IFNAME, the allow-train-nodes NetworkPolicy). Retried: the next attempt resumes "
            "from the last checkpoint")


def classify(exc: BaseException) -> BaseException:
    """A library's failure that has a known cause becomes our error with its one-line reason: CUDA out of
    memory (its own exit code) and a collective between the training processes failing or timing out."""
    if isinstance(exc, EntrypointError):
        return exc
    chain = _chain(exc)
    for cause in chain:
        if type(cause).__name__ == "OutOfMemoryError" or _OOM_RE.search(str(cause)):
            return GpuOutOfMemory(oom_reason(cause))
    for cause in chain:
        if type(cause).__name__ in _DIST_ERRORS or _PEERS_RE.search(str(cause)):
            return PeersLost(peers_lost_reason(cause))
    return exc


def describe(exc: BaseException) -> tuple[ExitCode, str]:
    """The exit code and the one-line reason for any failure: the contract's one mapping, used by the CLI
    and by each training process under torchrun (worker.main)."""
    failure = classify(exc)
    if isinstance(failure, EntrypointError):
        return failure.exit_code, str(failure) or type(failure).__name__
    if isinstance(failure, KeyboardInterrupt):
        return ExitCode.INTERRUPTED, "interrupted"
    if isinstance(failure, OSError) and failure.errno in _STORAGE_ERRORS:
        code, meaning = _STORAGE_ERRORS[failure.errno]
        where = " and ".join(str(name) for name in (failure.filename, failure.filename2) if name)
        return code, f"{where or 'the storage'}: {meaning}"
    return ExitCode.INTERNAL, f"{type(failure).__name__}: {failure}" if str(failure) else type(failure).__name__

