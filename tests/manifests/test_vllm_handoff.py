"""components/vllm-handoff: VLLM_URL and the merge pods' egress to vLLM come together, and only with it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from k8s_tasks.overlays import parse, render


def _policies(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("llm-config")]
    return config["data"]


def test_the_egress_to_vllm_exists_only_with_vllm_url(manifest_tree: Path, docs, tmp_path: Path):
    for overlay, rendered in docs.items():
        assert "allow-egress-vllm" not in _policies(rendered), overlay
        assert _config(rendered)["VLLM_URL"] == "", overlay

    tree = shutil.copytree(manifest_tree, tmp_path / "tree", symlinks=True)
    kustomization = tree / "overlays" / "dev" / "kustomization.yaml"
    text = kustomization.read_text()
    kustomization.write_text(text.replace("  - ../../components/job-identity\n",
                                          "  - ../../components/job-identity\n  - ../../components/vllm-handoff\n"))
    rendered = parse(render(tree / "overlays" / "dev"))
    policy = _policies(rendered)["allow-egress-vllm"]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "merge"
    assert policy["spec"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert _config(rendered)["VLLM_URL"] == "http://vllm.vllm.svc.cluster.local:8000"
    merge_pods = [d for d in rendered if d["kind"] == "Job" and
                  d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "merge"]
    assert merge_pods, "the policy selects the merge Job's pods"
