"""`invoke validate` stops on what CI would reject, and says where."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from invoke.exceptions import Exit

from k8s_tasks.validate import validate


def test_an_overlay_that_does_not_render_is_named(tree: Path) -> None:
    (tree / "overlays/gpu/patches/persistentvolume.nfs-server.yaml").unlink()
    with pytest.raises(Exit) as raised:
        validate(io.StringIO(), tree)
    assert "overlays/gpu` failed" in raised.value.message
    assert "persistentvolume.nfs-server.yaml" in raised.value.message


def test_an_invalid_field_fails_strict_validation(tree: Path) -> None:
    patch = tree / "overlays/dev/patches/job-train.deadlines.yaml"
    patch.write_text(patch.read_text().replace("spec:\n", "spec:\n  backofLimit: 2\n", 1))
    out = io.StringIO()
    with pytest.raises(Exit) as raised:
        validate(out, tree)
    assert "kubernetes-validate --strict against Kubernetes 1.31 failed" in raised.value.message
    assert "backofLimit" in raised.value.message
    assert "- render overlays/prod" in out.getvalue()  # every overlay was rendered first
