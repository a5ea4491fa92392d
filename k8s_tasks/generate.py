"""`invoke generate`: rewrite every generated file from its one source; `--check` only compares.

- base/llm-config.env (the ConfigMap's source) from entrypoint/settings.py (`configmap_env_text`);
- README.md, between its BEGIN/END marker comments: the configuration reference (`reference_markdown`), the
  exit codes (entrypoint/errors.py, `EXIT_MEANINGS`) and each overlay's hourly cost (k8s_tasks/prices.py, from
  the list prices kept there and the rendered overlays);
- tests/manifests/expected/<env>.yaml, the reviewed renders: `kubectl kustomize overlays/<env>` of a copy of
  the tree with the example mlflow.env (as tests/manifests and `invoke validate` render it).

Needs only the base install and kubectl. The tests fail on any stale file and name this command.
"""

from __future__ import annotations

import dataclasses
import difflib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from invoke.exceptions import Exit

from entrypoint.errors import EXIT_MEANINGS
from entrypoint.settings import configmap_env_text, reference_markdown
from k8s_tasks.overlays import copy_tree, parse, render_envs
from k8s_tasks.plan import Plan, Step, WriteFile, run_plan
from k8s_tasks.prices import costs_markdown
from k8s_tasks.tools import REPO

ENV_FILE = Path("base/llm-config.env")
README = Path("README.md")
EXPECTED_DIR = Path("tests/manifests/expected")
COMMAND = "invoke generate"


def exit_codes_markdown() -> str:
    """The README's exit-code table: the entrypoint's codes with the meanings `invoke status` shows."""
    rows = ["| Code | Meaning |", "|---|---|"]
    rows += [f"| {int(code)} | {meaning} |" for code, meaning in EXIT_MEANINGS.items()]
    return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class Section:
    """A generated part of a Markdown file: the lines between `<!-- BEGIN name ...-->` and `<!-- END name -->`."""

    name: str
    text: Callable[[], str]

    def replace(self, document: str, path: Path) -> str:
        begin, end = f"<!-- BEGIN {self.name}", f"<!-- END {self.name} -->"
        if begin not in document or end not in document:
            raise Exit(f"{path} has no {begin} ... --> / {end} markers around its generated {self.name.lower()}")
        start = document.index("\n", document.index(begin)) + 1
        return document[:start] + self.text().strip() + "\n" + document[document.index(end):]


def readme_text(current: str, renders: dict[str, str] | None = None, root: Path = REPO) -> str:
    """README.md with its generated sections rewritten from their sources. `renders`: each overlay's render, as
    overlay_renders gives it (rendered here when not given: the cost table reads the overlays)."""
    renders = overlay_renders(configmap_env_text(), root) if renders is None else renders
    docs = {env: parse(text) for env, text in renders.items()}
    sections = (Section("CONFIG REFERENCE", reference_markdown), Section("EXIT CODES", exit_codes_markdown),
                Section("OVERLAY COSTS", lambda: costs_markdown(docs)))
    for section in sections:
        current = section.replace(current, README)
    return current


def overlay_renders(env_text: str, root: Path = REPO) -> dict[str, str]:
    """Each overlay rendered from a copied tree whose base/llm-config.env is `env_text` (the generated one: the
    renders hold it, so one run brings both up to date)."""
    with tempfile.TemporaryDirectory(prefix="llama-generate-") as tmp:
        tree = copy_tree(Path(tmp), root)
        (tree / ENV_FILE).write_text(env_text, encoding="utf-8")
        return render_envs(tree)


def generated_files(root: Path = REPO) -> dict[Path, str]:
    """Every generated file (relative to root) with the content its source gives it: base/llm-config.env, the
    README's sections, and tests/manifests/expected/<env>.yaml, the reviewed renders."""
    env_text = configmap_env_text()
    renders = overlay_renders(env_text, root)
    return {
        ENV_FILE: env_text,
        README: readme_text((root / README).read_text(encoding="utf-8"), renders),
        **{EXPECTED_DIR / f"{env}.yaml": text for env, text in renders.items()},
    }


def _current(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def stale_files(files: dict[Path, str], root: Path = REPO) -> list[Path]:
    """The files whose content on disk differs from `files` (or that are missing)."""
    return [path for path, content in files.items() if not (root / path).is_file() or _current(root / path) != content]


def diff(path: Path, content: str, root: Path = REPO) -> str:
    """What generating would change in one file, as a unified diff."""
    return "".join(difflib.unified_diff(_current(root / path).splitlines(keepends=True),
                                        content.splitlines(keepends=True), f"a/{path}", f"b/{path}"))


def generate(out: TextIO, *, check: bool = False, dry_run: bool = False, root: Path = REPO) -> None:
    """Rewrite the stale generated files. With `check` or `dry_run`, only show what would change; `check` then
    fails when anything would."""
    files = generated_files(root)
    stale = stale_files(files, root)
    if not stale:
        print(f"every generated file is up to date ({len(files)} files)", file=out)
        return
    if check or dry_run:
        for path in stale:
            print(diff(path, files[path], root), file=out, end="")
        if check:
            raise Exit(f"stale generated files: {', '.join(map(str, stale))}: run `{COMMAND}` and review the diff")
        print("(dry run: nothing was changed)", file=out)
        return
    steps: list[Step] = [WriteFile(path, files[path], "generated: review the diff") for path in stale]
    run_plan(Plan(f"rewrite {len(stale)} stale generated file(s)", steps), dry_run=False, root=root, out=out)
