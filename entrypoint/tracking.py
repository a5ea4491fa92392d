"""MLflow: a bounded start-up check, one run per output, and logging that never stalls training.

Metrics go through a background thread with a bounded queue: a server that hangs or dies mid-run
costs log lines, never training time, and the run still completes and gets its marker. Only the calls
an MLflow 2.x server serves are used (runs, params, metrics, tags, artifacts, registry).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint.errors import ConfigError, Interrupted, TemporaryFailure

if TYPE_CHECKING:
    from entrypoint.settings import Settings

log = logging.getLogger("entrypoint")

PARAM_MAX = 250  # what every MLflow 2.x server accepts
BATCH_MAX = 100
DOWN_PAUSE = 30.0
SIGTERM_FLUSH_SECONDS = 5.0  # after a failed write, drop writes for this long instead of retrying each one


def redact_uri(uri: str) -> str:
    """The URI without credentials, for messages and tags."""
    parts = urllib.parse.urlsplit(uri)
    if not (parts.username or parts.password or parts.query):
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    netloc = f"***@{host}" if parts.username or parts.password else parts.netloc
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


def client_uri(uri: str) -> str:
    """The URI MLflow's client gets: without credentials, which travel in MLflow's own variables
    (settings.mlflow_client_env), since MLflow prints the tracking URI in its messages."""
    return redact_uri(uri).replace("***@", "", 1)


def preflight(uri: str, experiment: str, timeout: float) -> None:
    """Fail within `timeout` seconds when the tracking server cannot be used.

    Asks the server through MLflow's own HTTP layer and credentials (MLFLOW_TRACKING_USERNAME/PASSWORD,
    MLFLOW_TRACKING_TOKEN, TLS settings), so it checks exactly what the run will use, without retries.
    """
    scheme = urllib.parse.urlsplit(uri).scheme
    shown = redact_uri(uri)
    if scheme in ("", "file"):
        path = Path(urllib.parse.urlsplit(uri).path if scheme else uri)
        parent = path if path.exists() else path.parent
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"MLFLOW_TRACKING_URI={shown!r}: {parent} is not writable")
        return
    if scheme == "sqlite":
        db = Path(uri.split("sqlite:///", 1)[-1])
        if not os.access(db.parent if not db.exists() else db, os.W_OK):
            raise ConfigError(f"MLFLOW_TRACKING_URI={shown!r}: {db} is not writable")
        return
    if scheme not in ("http", "https"):
        log.info("MLflow tracking URI scheme %r: no start-up check", scheme)
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(client_uri(uri)), "/api/2.0/mlflow/experiments/get-by-name", "GET",
            max_retries=0, backoff_factor=0, timeout=timeout, raise_on_status=False,
            params={"experiment_name": experiment})
    except Exception as exc:  # requests' and MLflow's connection errors, timeouts, TLS failures
        reason = getattr(exc, "reason", None) or exc
        raise TemporaryFailure(
            f"MLflow at {shown} is unreachable ({reason}) after {timeout:g}s (MLFLOW_TIMEOUT_SECONDS); "
            "fix MLFLOW_TRACKING_URI or set TRACKING=none to train without tracking"
        ) from None
    if response.status_code in (200, 404):  # 404: the experiment does not exist yet; the server answered
        try:
            response.json()
        except ValueError:
            kind = response.headers.get("Content-Type", "no content type")
            raise TemporaryFailure(
                f"{shown} answered HTTP {response.status_code} with {kind}, not MLflow's JSON API: is "
                "MLFLOW_TRACKING_URI the tracking server itself (not a login page or a proxy's)?") from None
        return
    if response.status_code in (401, 403):
        raise ConfigError(
            f"MLflow at {shown} refused the credentials (HTTP {response.status_code}): check "
            "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN in the mlflow-config Secret"
        )
    raise TemporaryFailure(f"MLflow at {shown} answered HTTP {response.status_code}; retry later")


def _params(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, value in sorted(values.items()):
        text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
        out.append((key[:250], text[:PARAM_MAX]))
    return out


def _local_artifact_root(uri: str) -> str | None:
    """A local store keeps its artifacts beside the database, not in the current directory."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


class Tracker:
    """One MLflow run, written through a background thread; failures are logged, never raised."""

    def __init__(self, uri: str, timeout: float) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = client_uri(uri)
        self.timeout = timeout
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id: str | None = None
        self._logged_params: set[str] = set()  # params a resumed run already has
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue(maxsize=10000)
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self._down_until = 0.0
        self._closed_cleanly = False

    @classmethod
    def for_settings(cls, settings: Settings) -> Tracker | NullTracker:
        """The tracker the settings ask for: MLflow, or one that records nothing (TRACKING=none)."""
        if settings.tracking != "mlflow":
            return NullTracker()
        return cls(settings.mlflow_tracking_uri, settings.mlflow_timeout_seconds)

    @contextlib.contextmanager
    def run(self, experiment: str, run_id: str | None, run_name: str, tags: Mapping[str, str],
            close_timeout: float) -> Iterator[str]:
        """An open run whose final status follows the block: FINISHED when it ends normally, KILLED when
        SIGTERM interrupted it, FAILED otherwise. Pending writes get at most `close_timeout` seconds."""
        opened = self.open_run(experiment, run_id, run_name, tags)
        status, timeout = "FAILED", close_timeout
        try:
            yield opened
            status = "FINISHED"
        except Interrupted as exc:
            # After SIGTERM MLflow gets a few seconds at most: the pod's grace period is for the exit.
            status, timeout = "KILLED", min(close_timeout, SIGTERM_FLUSH_SECONDS, exc.time_left(close_timeout))
            raise
        finally:
            self.close(status, timeout=timeout)

    def attach(self, run_id: str) -> None:
        """Write to an existing run without changing its status (training ranks, the merge)."""
        self.run_id = run_id
        self._start_writer()

    def _start_writer(self) -> None:
        self._thread = threading.Thread(target=self._drain, name="mlflow-writer", daemon=True)
        self._thread.start()

    # Synchronous: run creation happens at start, where failing is right (the preflight passed): a server that
    # fails now is unavailable for the moment (75), and the retry resumes the same run.
    def open_run(self, experiment: str, run_id: str | None, run_name: str, tags: Mapping[str, str]) -> str:
        try:
            return self._open_run(experiment, run_id, run_name, tags)
        except Exception as exc:
            raise TemporaryFailure(f"MLflow at {redact_uri(self.uri)} could not open the run ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:300]}); retry later") from exc

    def _open_run(self, experiment: str, run_id: str | None, run_name: str, tags: Mapping[str, str]) -> str:
        if run_id:
            try:
                run = self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run.info.run_id
                self._logged_params = set(run.data.params)
                log.info("MLflow: resuming run %s", self.run_id)
            except Exception as exc:  # the run was deleted, or the server was reset
                log.warning("MLflow run %s cannot be resumed (%s): starting a new run", run_id, exc)
                run_id = None
        if not run_id:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=_local_artifact_root(self.uri))
            run = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
            self.run_id = run.info.run_id
            log.info("MLflow: created run %s in experiment %r", self.run_id, experiment)
        self._start_writer()
        return self.run_id  # type: ignore[return-value]

    def _call(self, what: str, args: tuple[Any, ...]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if what == "params":
            items = [Param(k, v) for k, v in args[0]]
            for i in range(0, len(items), BATCH_MAX):
                self.client.log_batch(self.run_id, params=items[i:i + BATCH_MAX])
        elif what == "metrics":
            metrics, step = args
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        elif what == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in args[0].items()])
        elif what == "artifact":
            self.client.log_artifact(self.run_id, args[0])
        elif what == "status":
            self.client.set_terminated(self.run_id, status=args[0])

    def _drain(self) -> None:
        while True:
            what, args = self._queue.get()
            try:
                if what == "stop":
                    return
                if time.monotonic() < self._down_until and what != "status":
                    self.dropped += 1  # the server is down: drop instead of stalling the queue
                    continue
                for attempt in range(3):
                    try:
                        self._call(what, args)
                        break
                    except Exception as exc:
                        if attempt == 2 or what == "status":
                            log.warning("MLflow %s failed, pausing tracking for %.0fs: %s", what, DOWN_PAUSE, exc)
                            self._down_until = time.monotonic() + DOWN_PAUSE
                            self.dropped += 1
                            break
                        time.sleep(1 + attempt)
            finally:
                self._queue.task_done()

    def _put(self, what: str, *args: Any) -> None:
        try:
            self._queue.put_nowait((what, args))
        except queue.Full:
            self.dropped += 1

    def log_params(self, values: Mapping[str, Any]) -> None:
        # A resumed run keeps what its first attempt logged: MLflow refuses to change a param, and one changed
        # value (POD_NAME differs on every retry, MASTER_PORT may) would make it refuse the whole batch.
        self._put("params", [(k, v) for k, v in _params(values) if k not in self._logged_params])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if clean:
            self._put("metrics", clean, step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._put("tags", dict(tags))

    def log_artifact(self, path: Path) -> None:
        if path.is_file():
            self._put("artifact", str(path))

    @property
    def synced(self) -> bool:
        """Everything written reached the server: nothing dropped during an outage, nothing left at close."""
        return self._closed_cleanly and self.dropped == 0

    def close(self, status: str | None, timeout: float) -> bool:
        """Send what is pending (and end the run with `status` unless None); wait at most `timeout` s."""
        if self._thread is None:
            return True
        if status:
            self._put("status", status)
        self._put("stop")
        self._thread.join(timeout)
        done = not self._thread.is_alive()
        self._closed_cleanly = done
        if self.dropped:
            log.warning("MLflow: %d writes were dropped while the server was unavailable", self.dropped)
        if not done:
            log.warning("MLflow: gave up waiting for %d pending writes after %.0fs", self._queue.qsize(), timeout)
        return done

    def register_version(self, name: str, version: Path, served_path: Path) -> str:
        """A registry version whose source the server accepts: a small artifact on the run (the version's
        manifest and configs), with the NFS path as a tag; the weights stay on the storage. Synchronous:
        the caller decides whether a failure matters."""
        from mlflow.exceptions import MlflowException

        artifact_path = f"merged-model/{version.name}"
        for small in (version / ".merge.json", version / "config.json", version / "generation_config.json"):
            if small.is_file():
                self.client.log_artifact(self.run_id, str(small), artifact_path)
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", exc)):
                raise
        model_version = self.client.create_model_version(
            name, source=f"runs:/{self.run_id}/{artifact_path}", run_id=self.run_id,
            tags={"storage_path": str(version), "served_path": str(served_path)},
            description=f"Merged model on NFS: {version}",
        )
        log.info("MLflow: registered %s version %s", name, model_version.version)
        return str(model_version.version)


def repair_run(uri: str, timeout: float, run_id: str, output: Path, artifacts: tuple[str, ...]) -> bool:
    """After an outage: send the loss and learning-rate points the run lacks (from trainer_log.jsonl), the
    artifacts, and the final status. True when the run is whole; never raises."""
    try:
        from mlflow.entities import Metric

        client = Tracker(uri, timeout).client
        have = {m.step for m in client.get_metric_history(run_id, "loss")}
        now = int(time.time() * 1000)
        missing = []
        for line in (output / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines():
            entry = json.loads(line) if line.strip() else {}
            step = entry.get("current_steps")
            if isinstance(step, int) and step not in have and isinstance(entry.get("loss"), (int, float)):
                missing.append(Metric("loss", float(entry["loss"]), now, step))
                if isinstance(entry.get("lr"), (int, float)):
                    missing.append(Metric("learning_rate", float(entry["lr"]), now, step))
        for i in range(0, len(missing), BATCH_MAX):
            client.log_batch(run_id, metrics=missing[i:i + BATCH_MAX])
        for name in artifacts:
            if (output / name).is_file():
                client.log_artifact(run_id, str(output / name))
        client.set_terminated(run_id, status="FINISHED")
    except Exception as exc:
        log.warning("MLflow: run %s could not be completed after the outage (%s); the next start tries again",
                    run_id, " ".join(str(exc).split())[:200])
        return False
    log.info("MLflow: completed run %s after an outage (%d points re-sent)", run_id, len(missing))
    return True


class NullTracker:
    """TRACKING=none: the Tracker's interface, recording nothing."""

    run_id: str | None = None
    synced = True

    @contextlib.contextmanager
    def run(self, experiment: str, run_id: str | None, run_name: str, tags: Mapping[str, str],
            close_timeout: float) -> Iterator[None]:
        yield None

    def attach(self, run_id: str) -> None:
        pass

    def log_params(self, values: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self, status: str | None, timeout: float) -> bool:
        return True
