"""One source of truth: the llm-config ConfigMap is exactly what the entrypoint's settings table declares."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from entrypoint.settings import FIELDS, configmap_env_text, default_configmap, load_settings
from k8s_tasks import generate
from k8s_tasks.overlays import ENVS, one, parse, render
from k8s_tasks.tools import REPO

ENV_FILE = REPO / generate.ENV_FILE


def _llm_config(docs: list[dict]) -> dict:
    found = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("llm-config-")]
    assert len(found) == 1, "one llm-config-<hash> ConfigMap expected"
    return found[0]


def test_env_file_is_generated_from_the_settings_table() -> None:
    assert ENV_FILE.read_text() == configmap_env_text(), (
        f"base/llm-config.env differs from entrypoint/settings.py FIELDS: run `{generate.COMMAND}` and review the diff"
    )


def test_every_variable_has_a_comment() -> None:
    lines = ENV_FILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            comment = []
            for above in reversed(lines[:i]):
                if not above.startswith("# ") or above.startswith("# ---"):
                    break
                comment.insert(0, above[2:])
            assert len(" ".join(comment)) > 20, f"no comment above {line!r}"


def test_base_configmap_equals_the_entrypoint_defaults(manifest_tree: Path) -> None:
    data = _llm_config(parse(render(manifest_tree / "base")))["data"]
    assert data == default_configmap()


def test_configmap_has_no_secret_and_no_pod_identity() -> None:
    # Secret values live in mlflow-config; JOB_NAME/POD_NAME/IMAGE come from the pod spec.
    kept_out = {f.env for f in FIELDS if not f.configmap}
    assert kept_out >= {"MLFLOW_TRACKING_URI", "JOB_NAME", "POD_NAME", "IMAGE"}
    assert not kept_out & set(default_configmap())


@pytest.mark.parametrize("overlay", ENVS)
def test_overlay_changes_only_what_its_kustomization_lists(overlay: str, docs: dict) -> None:
    data = _llm_config(docs[overlay])["data"]
    assert set(data) == set(default_configmap()), "an overlay may change values, never add or drop keys"
    kustomization = yaml.safe_load((REPO / "overlays" / overlay / "kustomization.yaml").read_text())
    literals = {}
    for generator in kustomization.get("configMapGenerator", []):
        if generator["name"] == "llm-config":
            assert generator.get("behavior") == "merge"
            literals.update(item.split("=", 1) for item in generator.get("literals", []))
    changed = {key: value for key, value in data.items() if value != default_configmap()[key]}
    assert changed == literals


@pytest.mark.parametrize("overlay", ENVS)
def test_overlay_config_passes_the_entrypoint_validation(overlay: str, docs: dict) -> None:
    """What the pods get (ConfigMap + Secret) is accepted by the entrypoint: no Job fails with exit 78."""
    env = dict(_llm_config(docs[overlay])["data"])
    secret = one(docs[overlay], "Secret")
    env.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})
    settings = load_settings(env)
    assert settings.webui_port > 0
