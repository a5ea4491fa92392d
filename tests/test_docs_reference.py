"""README.md's generated sections (configuration reference, exit codes) match their sources: they may not drift."""

from __future__ import annotations

import difflib

from helpers import REPO

from k8s_tasks.generate import COMMAND, README, readme_text


def test_readme_generated_sections_match_their_sources():
    text = (REPO / README).read_text()
    diff = "".join(difflib.unified_diff(text.splitlines(keepends=True), readme_text(text).splitlines(keepends=True),
                                        "README.md", "README.md as generated"))
    assert not diff, f"README.md's generated sections are stale: run `{COMMAND}` and review the diff:\n{diff}"
