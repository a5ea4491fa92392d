"""`invoke generate`: one command rewrites every generated file from its source (the ConfigMap's env file,
README's tables, the reviewed renders); `--check` changes nothing and fails naming each stale file."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from invoke.exceptions import Exit

from k8s_tasks.generate import ENV_FILE, EXPECTED_DIR, README, generate, readme_text
from k8s_tasks.overlays import copy_tree

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """What generate reads and writes, copied: the kustomize tree, README.md, the expected renders."""
    root = copy_tree(tmp_path / "repo", REPO)
    shutil.copyfile(REPO / README, root / README)
    shutil.copytree(REPO / EXPECTED_DIR, root / EXPECTED_DIR)
    return root


def test_every_generated_file_of_the_checkout_is_up_to_date() -> None:
    out = io.StringIO()
    generate(out, check=True)
    assert out.getvalue() == "every generated file is up to date (6 files)\n"


def test_check_names_each_stale_file_and_one_run_brings_all_up_to_date(checkout: Path) -> None:
    readme = (checkout / README).read_text()
    (checkout / README).write_text(readme.replace("| 78 | configuration or input error", "| 78 | bad input"))
    env_file = (checkout / ENV_FILE).read_text()
    (checkout / ENV_FILE).write_text(env_file.replace("\nSEED=42\n", "\nSEED=7\n"))  # as if edited by hand
    (checkout / EXPECTED_DIR / "prod.yaml").unlink()
    stale = [README, ENV_FILE, EXPECTED_DIR / "prod.yaml"]
    before = {path: (checkout / path).read_text() for path in stale if (checkout / path).exists()}

    out = io.StringIO()
    with pytest.raises(Exit) as raised:
        generate(out, check=True, root=checkout)
    assert raised.value.message == ("stale generated files: base/llm-config.env, README.md, "
                                    "tests/manifests/expected/prod.yaml: run `invoke generate` and review the diff")
    assert "-| 78 | bad input" in out.getvalue() and "+SEED=42" in out.getvalue()
    generate(io.StringIO(), dry_run=True, root=checkout)
    assert {path: (checkout / path).read_text() for path in before} == before  # nothing changed

    generate(io.StringIO(), root=checkout)
    for path in stale:
        assert (checkout / path).read_text() == (REPO / path).read_text(), path
    out = io.StringIO()
    generate(out, check=True, root=checkout)
    assert out.getvalue() == "every generated file is up to date (6 files)\n"


def test_readme_without_markers_is_refused_with_what_is_missing() -> None:
    with pytest.raises(Exit, match="README.md has no <!-- BEGIN CONFIG REFERENCE"):
        readme_text("# A README\n\n## Configuration reference\n\n| Variable |\n")
