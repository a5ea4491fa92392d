"""overlays/<env>/mlflow.env: the untracked file the overlay's secretGenerator makes the mlflow-config Secret from.

Values are secrets: they are never printed, only key names are.
"""

from __future__ import annotations

from pathlib import Path

from invoke.exceptions import Exit

from k8s_tasks.plan import WriteFile
from k8s_tasks.tools import REPO


def env_file(env: str) -> Path:
    return Path("overlays") / env / "mlflow.env"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped), as kustomize's secretGenerator reads them."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise Exit(f"cannot read {path}: {exc.strerror}") from None
    data: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        if not sep or not key.strip():
            raise Exit(f"{path}:{number}: not a KEY=VALUE line (the line is not shown: it may hold a secret)")
        data[key.strip()] = value
    return data


def _check_keys(data: dict[str, str], allowed: set[str], where: Path) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise Exit(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def mlflow_env_steps(env: str, source: Path | None, root: Path = REPO) -> tuple[list[WriteFile], list[str]]:
    """The step that creates overlays/<env>/mlflow.env from the user's file when it is missing, and notes.

    An existing file is never overwritten: a different --mlflow-env is refused, so a deploy cannot silently
    switch a cluster to other credentials.
    """
    target = env_file(env)
    example = root / target.with_name("mlflow.env.example")
    allowed = set(read_env_file(example))
    if source is None:
        if not (root / target).is_file():
            raise Exit(f"{target} is missing (the mlflow-config Secret is made from it): "
                       f"`cp {example.relative_to(root)} {target}` and fill in MLFLOW_TRACKING_URI "
                       "(and credentials if your server needs them), or pass --mlflow-env PATH")
        data = read_env_file(root / target)
        _check_keys(data, allowed, target)
        return [], _notes(data, target)
    data = read_env_file(source)
    _check_keys(data, allowed, source)
    content = source.read_text(encoding="utf-8")
    if (root / target).is_file():
        if (root / target).read_text(encoding="utf-8") == content:
            return [], _notes(data, target)
        raise Exit(f"{target} already exists and differs from {source}: the Secret is made from {target}; "
                   "edit it, or remove it to create it from --mlflow-env")
    note = f"from {source}: keys {', '.join(data)} (values not shown)"
    return [WriteFile(target, content, note, mode=0o600, secret=True)], _notes(data, target)


def _notes(data: dict[str, str], where: Path) -> list[str]:
    if not data.get("MLFLOW_TRACKING_URI", "").strip():
        return [f"{where} has no MLFLOW_TRACKING_URI: training fails at start unless the overlay sets TRACKING=none"]
    return []


def tracking_uri(env: str, root: Path = REPO) -> str:
    path = root / env_file(env)
    if not path.is_file():
        raise Exit(f"{env_file(env)} is missing: it names the MLflow server (see {env_file(env)}.example)")
    uri = read_env_file(path).get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise Exit(f"{env_file(env)} has no MLFLOW_TRACKING_URI")
    return uri
