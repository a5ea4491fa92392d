"""The exit-code contract and the one place that maps failures onto it.

Kubernetes reads the exit code (podFailurePolicy) and the termination log (`kubectl describe`,
`invoke status`); both are written here and nowhere else.
"""

from __future__ import annotations

import enum
import errno
import logging
import sys

log = logging.getLogger("entrypoint")

DEFAULT_TERMINATION_LOG = "/dev/termination-log"


class ExitCode(enum.IntEnum):
    """Documented in README.md ("Exit codes"); the Jobs' podFailurePolicy depends on these values."""

    OK = 0  # done, or skipped because the same work is already complete
    INTERNAL = 1  # unexpected failure: retriable
    TEMPORARY = 75  # a dependency is unavailable for now (MLflow down, output locked): retriable
    CONFIG = 78  # configuration or input error: retrying cannot help, the Job fails at once
    INTERRUPTED = 143  # stopped by SIGTERM (preemption, pod deletion): retriable, the rerun resumes

    @property
    def meaning(self) -> str:
        """What the code tells a user after a run: the one text the CLI epilog, `invoke status` and the
        README's table show."""
        return EXIT_MEANINGS[self]


# Codes the Jobs' podFailurePolicy does not retry (FailJob): training records them beside its output, so a
# merge waiting for it stops waiting.
TERMINAL_CODES = frozenset({ExitCode.CONFIG})

EXIT_MEANINGS = {
    ExitCode.OK: "done, or skipped because the same work was already complete",
    ExitCode.INTERNAL: "unexpected failure (retried up to backoffLimit)",
    ExitCode.TEMPORARY: "a dependency was unavailable (MLflow unreachable, output locked): retried",
    ExitCode.CONFIG: "configuration or input error: retrying cannot help, the Job fails at once",
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


def describe_failure(exc: BaseException) -> tuple[ExitCode, str]:
    """The exit code and the one-line message for any exception: the single place failures become the
    contract (cli.main, and each training rank's report in worker.main)."""
    if isinstance(exc, EntrypointError):
        return exc.exit_code, str(exc) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED, "interrupted"
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRORS:
        code, meaning = _STORAGE_ERRORS[exc.errno]
        where = " and ".join(str(name) for name in (exc.filename, exc.filename2) if name)
        return code, f"{where or 'the storage'}: {meaning}"
    return ExitCode.INTERNAL, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

