"""The configuration reference in README.md is generated from the settings table: it may not drift."""

from __future__ import annotations

from helpers import REPO

from entrypoint.settings import reference_markdown

BEGIN = "<!-- BEGIN CONFIG REFERENCE"
END = "<!-- END CONFIG REFERENCE -->"


def test_readme_reference_matches_the_settings_table():
    text = (REPO / "README.md").read_text()
    start = text.index("\n", text.index(BEGIN)) + 1
    section = text[start:text.index(END)].strip()
    assert section == reference_markdown().strip(), (
        "README.md's configuration reference is stale: replace it with `python -m entrypoint config`"
    )
