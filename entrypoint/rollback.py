"""`python -m entrypoint rollback [--to vNNNN]`: serve an earlier published version again.

Under the publish lock (no merge publishes meanwhile), MERGED_MODEL_PATH switches atomically to the target:
by default the newest version older than the one served, else the one named by --to (a number such as v0002,
or the full name; a newer version too, which rolls forward). The version rolled back from is recorded by its
inputs' fingerprint in <MERGED_MODEL_PATH>.versions/rolled-back.json: a later merge of the same adapter
skips instead of publishing it again, and says so; rolling forward to it (--to) lifts the record. With
REGISTERED_MODEL_NAME set, the registry's `champion` alias moves to the target's registered version.
vLLM reads the path at start: restart it (or roll its Deployment) to serve the target.
"""

from __future__ import annotations

import logging
from pathlib import Path

from entrypoint.errors import ConfigError, ExitCode, TemporaryFailure, finish
from entrypoint.publish import Published
from entrypoint.settings import Settings
from entrypoint.storage import OutputLock, lock_path_for, owner_id

log = logging.getLogger("entrypoint")


def run(settings: Settings, to: str | None = None) -> int:
    published = Published.at(Path(settings.merged_model_path))
    lock = OutputLock(lock_path_for(published.path), ttl=settings.lock_ttl_seconds, owner=owner_id(settings.pod_name))
    with lock.held(settings.lock_wait_seconds):
        current = published.current()
        if current is None:
            raise ConfigError(f"MERGED_MODEL_PATH={str(published.path)!r} serves no published version: nothing to "
                              "roll back")
        target = choose_target(published, current, to)
        if target == current:
            return finish(ExitCode.OK, f"{published.path} already serves {current.name}; nothing changed")
        registered = registered_version(settings, target)  # before the switch: registry trouble changes nothing
        published.switch(target)
        published.record_rollback(current, target)
    log.info("%s now serves %s (was %s)", published.path, target.name, current.name)
    if registered is not None:
        try:
            registered[0].set_registered_model_alias(settings.registered_model_name, "champion", registered[1])
            log.info("MLflow: %s champion -> version %s (%s)", settings.registered_model_name, registered[1],
                     target.name)
        except Exception as exc:  # the switch is done: a retried Job must not roll back once more
            log.warning("MLflow: the alias champion of %s did not move to version %s: %s; set it by hand",
                        settings.registered_model_name, registered[1], exc)
    return finish(ExitCode.OK, f"rolled back: {published.path} -> {target.name} (was {current.name}); restart vLLM "
                  "to serve it")


def choose_target(published: Published, current: Path, to: str | None) -> Path:
    available = ", ".join(v.name for v in published.versions_sorted()) or "none"
    if to is None:
        target = published.rollback_target(current)
        if target is None:
            raise ConfigError(f"no version older than {current.name} is kept in {published.versions} (kept: "
                              f"{available}); name one with --to")
        return target
    target = published.find(to)
    if target is None:
        raise ConfigError(f"--to {to!r}: no such version in {published.versions}; kept: {available}")
    return target


def registered_version(settings: Settings, target: Path):
    """(client, version number) of the target's registry version, when a registry name is configured; None
    when it was never registered. An unreachable registry stops the rollback before anything changes."""
    if not settings.registered_model_name or settings.tracking != "mlflow":
        return None
    from entrypoint.tracking import Tracker

    name = settings.registered_model_name
    try:
        client = Tracker(settings.mlflow_tracking_uri, settings.mlflow_timeout_seconds).client
        found = [v for v in client.search_model_versions(f"name='{name}'")
                 if (v.tags or {}).get("storage_path") == str(target)]
    except Exception as exc:
        raise TemporaryFailure(f"MLflow registry unreachable ({type(exc).__name__}: {str(exc)[:200]}); nothing "
                               "was rolled back (the alias champion must move with the served version)") from None
    if not found:
        log.warning("MLflow: no version of %s is registered for %s; the alias champion stays where it was",
                    name, target.name)
        return None
    return client, found[0].version
