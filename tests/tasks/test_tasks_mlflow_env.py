"""deploy and the MLflow Secret: created from the user's file when missing, never overwritten, never printed."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from invoke.exceptions import Exit
from k8s_task_objects import DEPLOYED

from k8s_tasks.deploy import plan_deploy
from k8s_tasks.plan import run_plan

SECRET = "s3cret-Pa55"


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my-mlflow.env"
    path.write_text(f"MLFLOW_TRACKING_URI=https://mlflow.example.com\nMLFLOW_TRACKING_PASSWORD={SECRET}\n")
    return path


def test_missing_file_tells_how_to_create_it(tree: Path, environ: dict[str, str]) -> None:
    (tree / "overlays/gpu/mlflow.env").unlink()
    with pytest.raises(Exit) as raised:
        plan_deploy("gpu", "all", DEPLOYED["gpu"], root=tree, environ=environ)
    assert raised.value.message == (
        "overlays/gpu/mlflow.env is missing (the mlflow-config Secret is made from it): "
        "`cp overlays/gpu/mlflow.env.example overlays/gpu/mlflow.env` and fill in MLFLOW_TRACKING_URI "
        "(and credentials if your server needs them), or pass --mlflow-env PATH")


def test_it_is_created_from_the_users_file_and_no_value_is_printed(tree: Path, environ: dict[str, str],
                                                                    user_file: Path) -> None:
    (tree / "overlays/dev/mlflow.env").unlink()
    plan = plan_deploy("dev", "all", DEPLOYED["dev"], mlflow_env=user_file, root=tree, environ=environ)
    out = io.StringIO()
    run_plan(plan, dry_run=True, root=tree, out=out, environ=environ)
    text = out.getvalue()
    assert f"write overlays/dev/mlflow.env (mode 600): from {user_file}: keys MLFLOW_TRACKING_URI, " \
           "MLFLOW_TRACKING_PASSWORD (values not shown)" in text
    assert SECRET not in text
    assert "mlflow.example.com" not in text
    assert not (tree / "overlays/dev/mlflow.env").exists()  # dry run


def test_an_existing_different_file_is_never_overwritten(tree: Path, environ: dict[str, str],
                                                         user_file: Path) -> None:
    with pytest.raises(Exit, match="already exists and differs"):
        plan_deploy("dev", "all", DEPLOYED["dev"], mlflow_env=user_file, root=tree, environ=environ)
    (tree / "overlays/dev/mlflow.env").write_text(user_file.read_text())
    plan = plan_deploy("dev", "all", DEPLOYED["dev"], mlflow_env=user_file, root=tree, environ=environ)
    assert not any(str(getattr(step, "path", "")).endswith("mlflow.env") for step in plan.steps)


def test_unknown_keys_and_broken_lines_are_refused_without_showing_values(tree: Path, environ: dict[str, str],
                                                                          tmp_path: Path) -> None:
    (tree / "overlays/dev/mlflow.env").unlink()
    typo = tmp_path / "typo.env"
    typo.write_text(f"MLFLOW_TRACKING_URL=https://x\nMLFLOW_TRACKING_PASSWORD={SECRET}\n")
    with pytest.raises(Exit) as raised:
        plan_deploy("dev", "all", DEPLOYED["dev"], mlflow_env=typo, root=tree, environ=environ)
    assert "unknown key(s) MLFLOW_TRACKING_URL" in raised.value.message
    assert SECRET not in raised.value.message
    broken = tmp_path / "broken.env"
    broken.write_text(f"MLFLOW_TRACKING_URI=https://x\n{SECRET}\n")
    with pytest.raises(Exit) as raised:
        plan_deploy("dev", "all", DEPLOYED["dev"], mlflow_env=broken, root=tree, environ=environ)
    assert f"{broken}:2: not a KEY=VALUE line" in raised.value.message
    assert SECRET not in raised.value.message
