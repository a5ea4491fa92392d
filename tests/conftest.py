"""Shared fixtures: a tiny model generated once per session, a real MLflow server on 127.0.0.1, and
a storage folder laid out like /storage per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MlflowServer, Storage, start_mlflow


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from entrypoint.tinymodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "base-model")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture
def storage(tmp_path: Path, tiny_model: Path) -> Storage:
    from entrypoint.tinymodel import write_demo_data

    root = tmp_path / "storage"
    (root / "models").mkdir(parents=True)
    write_demo_data(root / "data")
    return Storage(root, tiny_model)
