"""The docs speak about this repository only, name what exists, and keep the architecture decisions as records.

- Every ADR has a status, a date, a context, a decision, alternatives with pros and cons, and consequences;
  a superseded record names its successor and the successor names it back; the index lists every record.
- Every repository path the README, the guide and the ADRs name exists (a file the user creates from a
  committed `*.example` counts), and every exit code they name is one of the contract's.
- No doc refers to files outside the repository, machine paths or internal labels; no tracked file calls
  the original design by another name.
(Commands, tasks, options and settings named in the docs are checked in tests/test_docs.py.)
"""

from __future__ import annotations

import datetime
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
from helpers import REPO
from test_docs import code_fragments, doc_files, links, prose_lines, rel

from entrypoint.errors import ExitCode

ADR_DIR = REPO / "docs" / "adr"
ADR_FILE_RE = re.compile(r"^(\d{3})-[a-z0-9-]+\.md$")
REQUIRED_SECTIONS = ("Context", "Decision", "Alternatives", "Consequences")


def adr_files() -> list[Path]:
    return sorted(p for p in ADR_DIR.glob("*.md") if ADR_FILE_RE.match(p.name))


def sections(text: str) -> dict[str, str]:
    """Level-2 headings -> their body (up to the next level-2 heading)."""
    found: dict[str, str] = {}
    current = None
    for _, line in prose_lines(text):
        if line.startswith("## "):
            current = line[3:].strip()
            found[current] = ""
        elif current is not None:
            found[current] += line + "\n"
    return found


def header_field(text: str, name: str) -> str | None:
    """`- Name: value` in the header (before the first section), continuation lines joined."""
    head = text.split("\n## ", 1)[0]
    match = re.search(rf"^- {name}: (.*(?:\n  .*)*)", head, re.MULTILINE)
    return " ".join(match.group(1).split()) if match else None


def test_there_are_adrs_and_an_index():
    assert len(adr_files()) >= 11
    assert (ADR_DIR / "README.md").is_file()


@pytest.mark.parametrize("adr", adr_files(), ids=lambda p: p.name)
def test_every_adr_is_a_complete_record(adr: Path):
    text = adr.read_text(encoding="utf-8")
    number = ADR_FILE_RE.match(adr.name).group(1)
    assert re.match(rf"# ADR-{number}: \S", text), f"{rel(adr)} must start with '# ADR-{number}: <decision>'"
    status = header_field(text, "Status")
    assert status and re.match(r"(accepted|proposed|rejected|deprecated|superseded)\b", status), (
        f"{rel(adr)}: '- Status: accepted|proposed|rejected|deprecated|superseded ...' is missing")
    date = header_field(text, "Date")
    assert date and datetime.date.fromisoformat(date), f"{rel(adr)}: '- Date: YYYY-MM-DD' is missing"
    found = sections(text)
    assert [s for s in REQUIRED_SECTIONS if s not in found] == [], f"{rel(adr)} has sections {list(found)}"
    alternatives = re.split(r"^### ", found["Alternatives"], flags=re.MULTILINE)[1:]
    assert alternatives, f"{rel(adr)}: each alternative is a '### <name>' under '## Alternatives'"
    for alternative in alternatives:
        name = alternative.splitlines()[0]
        assert "**Pros:**" in alternative and "**Cons:**" in alternative, (
            f"{rel(adr)}: alternative {name!r} needs '**Pros:**' and '**Cons:**'")


def _adr_links(text: str) -> set[str]:
    return set(re.findall(r"\]\((\d{3}-[a-z0-9-]+\.md)\)", text))


def test_superseded_records_and_their_successors_name_each_other():
    records = {p.name: p.read_text(encoding="utf-8") for p in adr_files()}
    problems = []
    for name, text in records.items():
        for old in _adr_links(header_field(text, "Supersedes") or ""):
            if old not in records:
                problems.append(f"{name} supersedes {old}, which does not exist")
            elif "superseded" not in (header_field(records[old], "Status") or "") \
                    or name not in _adr_links(header_field(records[old], "Status") or ""):
                problems.append(f"{name} supersedes {old}, whose status does not say 'superseded ... by' {name}")
        status = header_field(text, "Status") or ""
        if "superseded" in status:
            successors = _adr_links(status)
            if not successors:
                problems.append(f"{name} is superseded but its status links no successor")
            for new in successors:
                if name not in _adr_links(header_field(records.get(new, ""), "Supersedes") or ""):
                    problems.append(f"{name} is superseded by {new}, which has no '- Supersedes:' naming it")
    assert problems == [], "\n".join(problems)


def test_the_index_lists_every_record_with_its_title_status_and_date():
    index = (ADR_DIR / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in index.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.match(r"\[(\d{3})\]\((\d{3}-[a-z0-9-]+\.md)\)$", cells[0]) if len(cells) == 4 else None
        if match:
            rows[match.group(2)] = cells
    problems = []
    for adr in adr_files():
        text = adr.read_text(encoding="utf-8")
        if adr.name not in rows:
            problems.append(f"docs/adr/README.md does not list {adr.name}")
            continue
        _, title, status, date = rows.pop(adr.name)
        if title != text.splitlines()[0].split(": ", 1)[1]:
            problems.append(f"{adr.name}: the index says {title!r}")
        if date != header_field(text, "Date"):
            problems.append(f"{adr.name}: the index dates it {date}")
        if ("superseded" in status) != ("superseded" in (header_field(text, "Status") or "")):
            problems.append(f"{adr.name}: the index says {status!r}, the record {header_field(text, 'Status')!r}")
    problems += [f"docs/adr/README.md lists {name}, which does not exist" for name in rows]
    assert problems == [], "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# Paths, exit codes, and what the docs must not contain

TOP_DIRS = ("base", "components", "overlays", "entrypoint", "k8s_tasks", "tests", "docs", "scripts", "docker",
            "benchmarks", ".ci")
PATH_RE = re.compile(rf"(?<![\w./~$-])((?:{'|'.join(re.escape(d) for d in TOP_DIRS)})/[\w./-]*"
                     r"|tasks\.py|dev\.sh|requirements\.lock|pyproject\.toml)(?![\w-])")


@cache
def tracked() -> tuple[str, ...]:
    result = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"git ls-files failed: {result.stderr}"
    return tuple(result.stdout.splitlines())


def path_exists(path: str) -> bool:
    """A tracked file or directory, a path the docs abbreviate (`docs/adr/009`, `base/networkpolicy-*`), or
    a file the user makes from a committed `<path>.example`; new files not yet committed count too."""
    path = path.rstrip(".")
    target = REPO / path
    return target.exists() or Path(f"{target}.example").exists() or any(t.startswith(path) for t in tracked())


def named_paths(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        without_urls = re.sub(r"https?://\S+", "", line).replace("./", "")
        found += [(number, m.group(1)) for m in PATH_RE.finditer(without_urls)]
    return found


def test_named_paths_extraction():
    sample = ("See `entrypoint/errors.py`, base/job-merge.yaml and docs/adr/009; `overlays/<env>/mlflow.env`;\n"
              "https://huggingface.co/docs/x and /storage/data and tasks.py, ./dev.sh test.\n")
    assert named_paths(sample) == [(1, "entrypoint/errors.py"), (1, "base/job-merge.yaml"), (1, "docs/adr/009"),
                                   (1, "overlays/"), (2, "tasks.py"), (2, "dev.sh")]


def test_paths_named_in_the_docs_exist():
    problems, seen = [], 0
    for doc in doc_files():
        for line, path in named_paths(doc.read_text(encoding="utf-8")):
            seen += 1
            if not path_exists(path):
                problems.append(f"{rel(doc)}:{line}: {path} does not exist in the repository")
    assert seen >= 50, "the docs should name repository paths; the extraction found almost none"
    assert problems == [], "\n".join(problems)


EXIT_CODE_RE = re.compile(r"\b(?:exit(?:s|ed)?(?: with| code)?|kod(?:em|u|y)?(?: wyjścia)?)\s+(\d+)\b",
                          re.IGNORECASE)
NOT_OURS = {137: "SIGKILL, named in the docs as not the entrypoint's"}


def test_exit_codes_named_in_the_docs_exist():
    known = {int(code) for code in ExitCode} | set(NOT_OURS)
    problems, seen = [], 0
    for doc in doc_files():
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
            for code in EXIT_CODE_RE.findall(line):
                seen += 1
                if int(code) not in known:
                    problems.append(f"{rel(doc)}:{number}: exit code {code} is not in entrypoint/errors.py")
    assert seen >= 20
    assert problems == [], "\n".join(problems)


# What a reader of this repository cannot follow: files and paths of the machines it was written on,
# internal labels of the work, and other names for the original design.
OUTSIDE = re.compile(r"\b(REFERENCE|ARCHITECTURE|STYLE)\.md\b|/work/|\.\./shared\b|(?i:\bthe seed\b|\bseed's\b)")
DOCS_ONLY = re.compile(r"\bP\d{1,2}\b|(?i:\bchecked here\b)")
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".sh", ".puml", ".toml", ".txt", ".json", ".example", ".env",
                 ".lock", ""}


def test_docs_refer_to_this_repository_only():
    problems = []
    for doc in doc_files():
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
            for pattern in (OUTSIDE, DOCS_ONLY):
                if match := pattern.search(line):
                    problems.append(f"{rel(doc)}:{number}: {match.group(0)!r}")
        for line, target in links(doc.read_text(encoding="utf-8")):
            if target.startswith("/") or target.startswith("file:"):
                problems.append(f"{rel(doc)}:{line}: link to {target!r} outside the repository")
    assert problems == [], "\n".join(problems)


def test_no_tracked_file_refers_outside_the_repository():
    problems = []
    for name in tracked():
        path = REPO / name
        if path == Path(__file__) or path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if match := OUTSIDE.search(line):
                problems.append(f"{name}:{number}: {match.group(0)!r}")
    assert problems == [], "\n".join(problems)


def test_code_spans_are_read_the_same_way_as_in_test_docs():
    """The path check reads whole lines (prose and code alike); code spans are a subset of them."""
    text = "Use `docs/adr/README.md` and\n```bash\nbash scripts/render-diagrams.sh\n```\n"
    spans = [f.code for f in code_fragments(text)]
    assert spans == ["docs/adr/README.md", "bash scripts/render-diagrams.sh"]
    assert [p for _, p in named_paths(text)] == ["docs/adr/README.md", "scripts/render-diagrams.sh"]
