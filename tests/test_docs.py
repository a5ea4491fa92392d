"""The documentation stays true to the code.

- Every diagram in docs/diagrams parses (`plantuml -checkonly`), and the PNG beside it embeds its
  current source (PlantUML writes the source into an iTXt chunk named "plantuml").
- Every `invoke ...` in README.md and docs/**/*.md names a task of tasks.py and only options that task has.
- Every `python -m entrypoint ...` names a command of entrypoint.cli (and options it has).
- Every setting named in the docs exists in entrypoint.settings.FIELDS (the rule is below, at SETTING_*).
- Every relative link points to an existing file (and heading, when it has an anchor).

Commands and settings are read from code only: inline code spans and fenced code blocks, where a reader
copies them from. A missing tool (plantuml) or a missing tasks.py fails these tests; nothing is skipped.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from helpers import REPO

from entrypoint.cli import COMMANDS, build_parser
from entrypoint.errors import ExitCode
from entrypoint.settings import FIELDS, FIELDS_BY_ATTR, FIELDS_BY_ENV

DIAGRAM_DIR = REPO / "docs" / "diagrams"
EXPECTED_DIAGRAMS = ("architecture", "workflow", "dependencies")
GUIDE = REPO / "docs" / "PRZEWODNIK-UZYCIA.md"


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------------------------------------------------
# Reading code out of Markdown

FENCE_RE = re.compile(r"^\s{0,3}(`{3,}|~{3,})(.*)$")
INLINE_CODE_RE = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")


@dataclass(frozen=True)
class Fragment:
    line: int
    code: str
    fenced: bool  # a line of a fenced block (else an inline code span)


def code_fragments(text: str) -> Iterator[Fragment]:
    """Each line of every fenced code block, and each inline code span outside them."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE_RE.match(line)
        if fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not match.group(2).strip():
                fence = None
            else:
                yield Fragment(number, line, fenced=True)
        elif match:
            fence = match.group(1)
        else:
            for span in INLINE_CODE_RE.finditer(line):
                yield Fragment(number, span.group(2).strip(), fenced=False)


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """The lines outside fenced code blocks (where links and headings live)."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE_RE.match(line)
        if fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not match.group(2).strip():
                fence = None
        elif match:
            fence = match.group(1)
        else:
            yield number, line


# A command ends at a shell separator or a comment.
COMMAND_END_RE = re.compile(r"\s+#|&&|\|\||;|\s\|\s|\)|`")


def _command_tail(code: str, start: int) -> list[str]:
    rest = code[start:]
    end = COMMAND_END_RE.search(rest)
    return (rest[:end.start()] if end else rest).split()


OPTION_RE = re.compile(r"^(--?[A-Za-z0-9][\w-]*)")
INVOKE_RE = re.compile(r"(?<![\w./-])invoke(?=\s)")


@dataclass(frozen=True)
class InvokeCommand:
    line: int
    text: str
    core_options: tuple[str, ...]  # options before the task: invoke's own (--list, --help)
    task: str | None
    options: tuple[str, ...]  # --name or -x, without values


def invoke_commands(text: str) -> list[InvokeCommand]:
    found = []
    for fragment in code_fragments(text):
        for match in INVOKE_RE.finditer(fragment.code):
            tokens = _command_tail(fragment.code, match.end())
            core: list[str] = []
            while tokens and tokens[0].startswith("-"):
                core.append(OPTION_RE.match(tokens.pop(0)).group(1))  # type: ignore[union-attr]
            task = tokens.pop(0) if tokens else None
            options = tuple(m.group(1) for t in tokens if (m := OPTION_RE.match(t)))
            shown = " ".join(["invoke", *core, *([task] if task else []), *tokens])
            found.append(InvokeCommand(fragment.line, shown, tuple(core), task, options))
    return found


ENTRYPOINT_RE = re.compile(r"(?<![\w./-])python3?\s+-m\s+entrypoint(?=\s)")


@dataclass(frozen=True)
class EntrypointCommand:
    line: int
    commands: tuple[str, ...]  # `train|merge` in a table names several
    options: tuple[str, ...]


def entrypoint_commands(text: str) -> list[EntrypointCommand]:
    found = []
    for fragment in code_fragments(text):
        for match in ENTRYPOINT_RE.finditer(fragment.code):
            tokens = _command_tail(fragment.code, match.end())
            if not tokens or tokens[0].startswith("-"):
                found.append(EntrypointCommand(fragment.line, (), tuple(tokens[:1])))
                continue
            options = tuple(m.group(1) for t in tokens[1:] if (m := OPTION_RE.match(t)))
            # `train|merge` in prose, `train\|merge` inside a table cell
            found.append(EntrypointCommand(fragment.line, tuple(re.split(r"\\?\|", tokens[0])), options))
    return found


# Settings: a name is taken for a setting of ours when it is written in code as
#   - a whole inline code span: `LORA_RANK`, `REPLACE_OUTPUT=true`, `$MERGED_MODEL_PATH`;
#   - a variable assignment at the start of a line of a fenced block: `LORA_RANK=16`, `- LORA_RANK=16`,
#     `export LORA_RANK=16`; or a reference `$NAME` / `${NAME}` anywhere in a fenced block;
# and it looks like a variable (upper case, digits and underscores, 3 characters or more). Names that are
# not the entrypoint's settings (cloud, MLflow client, PyTorch, Hugging Face, Gradio, vLLM and shell
# variables) are allowed by the lists below; every other such name must be in settings.FIELDS.
SETTING_NAME = r"[A-Z][A-Z0-9_]{2,}"
SETTING_SPAN_RE = re.compile(rf"^\$?\{{?({SETTING_NAME})\}}?(?:=\S*)?$")
SETTING_ASSIGN_RE = re.compile(rf"^\s*(?:-\s+|export\s+)?({SETTING_NAME})=")
SETTING_REF_RE = re.compile(rf"\$\{{?({SETTING_NAME})\b")
NOT_SETTINGS = {
    # Deploy side (tasks.py, the shell): the registry and the cluster, and the quickstart's shell variables and
    # GPU quota names.
    "PROJECT_ID", "REGION", "REPOSITORY", "KUBECONFIG", "PATH", "HOME", "TMPDIR", "USER", "PYTHON", "CI",
    "DEBIAN_FRONTEND", "JDK_JAVA_OPTIONS", "ZONE", "CLUSTER", "PROJECT_NUMBER", "NVIDIA_L4_GPUS", "GPUS_ALL_REGIONS",
    # The MLflow client reads these itself (the mlflow-config Secret); they are not entrypoint settings.
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_RUN_ID", "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    # torchrun / torch.distributed and the Job's indexed completion.
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "FORCE_TORCHRUN",
    "JOB_COMPLETION_INDEX",
    # A key of the kustomize-local ConfigMap that names each Job (components/job-identity, ADR-009).
    "JOB_SPEC",
    # docker/Dockerfile: a build argument, and what the image sets for MLflow and other libraries.
    "BASE_IMAGE", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
    # Signals and open(2) flags.
    "SIGTERM", "SIGKILL", "SIGINT", "O_CREAT", "O_EXCL",
    # Values of a setting, not names of one.
    *FIELDS_BY_ATTR["log_level"].choices,
}
NOT_SETTING_PREFIXES = ("HF_", "TRANSFORMERS_", "NCCL_", "CUDA_", "PYTORCH_", "TORCH_", "GRADIO_", "VLLM_")


def is_setting_candidate(name: str) -> bool:
    return name not in NOT_SETTINGS and not name.startswith(NOT_SETTING_PREFIXES)


def setting_names(text: str) -> list[tuple[int, str]]:
    found = []
    for fragment in code_fragments(text):
        names: list[str] = []
        if fragment.fenced:
            names += SETTING_ASSIGN_RE.findall(fragment.code)
            names += SETTING_REF_RE.findall(fragment.code)
        elif match := SETTING_SPAN_RE.match(fragment.code):
            names.append(match.group(1))
        found += [(fragment.line, name) for name in dict.fromkeys(names) if is_setting_candidate(name)]
    return found


LINK_RE = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def links(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(text):
        without_code = INLINE_CODE_RE.sub("", line)
        found += [(number, target) for target in LINK_RE.findall(without_code)]
    return found


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        match = HEADING_RE.match(line)
        if not match:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))  # a link keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


# ---------------------------------------------------------------------------------------------------------
# The extraction itself, on sample text

SAMPLE = """\
# Title

Run `invoke deploy --env=gpu --component webui` first, then `invoke train`.
Plain prose that mentions invoke train --bogus is not code and is not read.

```bash
invoke train --env=<dev|gpu|prod> --name my-run --follow   # streams the logs
invoke --list
export PROJECT_ID=my-project
LORA_RANK=16 python -m entrypoint train && invoke logs
echo "${MERGED_MODEL_PATH}" $HF_HOME
```

Set `REPLACE_OUTPUT=true` or `TRACKING`, not `HF_TOKEN`; `python -m entrypoint train|merge`,
`python -m entrypoint check\\|config` (in a table), `python -m entrypoint demo --storage DIR --steps 5`,
a [link](docs/x.md#part) and ![img](a.png "t").
"""


def test_invoke_commands_are_read_from_code_only():
    commands = invoke_commands(SAMPLE)
    assert [(c.line, c.task, c.options) for c in commands] == [
        (3, "deploy", ("--env", "--component")),
        (3, "train", ()),
        (7, "train", ("--env", "--name", "--follow")),
        (8, None, ()),
        (10, "logs", ()),
    ]
    assert commands[3].core_options == ("--list",)


def test_entrypoint_commands_are_read_with_their_options():
    commands = entrypoint_commands(SAMPLE)
    assert [(c.line, c.commands, c.options) for c in commands] == [
        (10, ("train",), ()),
        (14, ("train", "merge"), ()),
        (15, ("check", "config"), ()),
        (15, ("demo",), ("--storage", "--steps")),
    ]


def test_setting_names_follow_the_rule():
    assert setting_names(SAMPLE) == [(10, "LORA_RANK"), (11, "MERGED_MODEL_PATH"), (14, "REPLACE_OUTPUT"),
                                     (14, "TRACKING")]


def test_links_and_anchors_are_read_outside_code():
    assert links(SAMPLE + "`[not](a/link.md)`\n") == [(16, "docs/x.md#part"), (16, "a.png")]
    assert heading_anchors("# Exit codes\n## Ścieżka `invoke` (klaster)\n# Exit codes\n") == {
        "exit-codes", "ścieżka-invoke-klaster", "exit-codes-1"}


def test_invoke_help_options_are_parsed():
    help_text = """Usage: inv[oke] [--core-opts] deploy [--options] [other tasks here ...]

Docstring:
  Apply an overlay (see --not-an-option here).

Options:
  -c STRING, --component=STRING   all, base or webui
  -d, --dry-run                   print the plan
  -e STRING, --env=STRING         dev, gpu or prod
  -w, --[no-]wait                 wait for the WebUI
"""
    assert task_options(help_text) == {"-c", "--component", "-d", "--dry-run", "-e", "--env", "-w", "--wait",
                                       "--no-wait", "-h", "--help"}


# ---------------------------------------------------------------------------------------------------------
# Diagrams

def plantuml() -> str:
    found = shutil.which("plantuml")
    if found is None:
        pytest.fail("plantuml not found on PATH: run `bash scripts/ensure-tools.sh` first (it installs Debian's "
                    "plantuml)")
    return found


def test_the_three_diagrams_exist():
    present = sorted(p.stem for p in DIAGRAM_DIR.glob("*.puml"))
    assert set(EXPECTED_DIAGRAMS) <= set(present), f"docs/diagrams has {present}"


def syntax_error(tool: str, source: Path) -> str:
    """`plantuml -syntax` on one file: where the first error is, for the failure message."""
    result = subprocess.run([tool, "-syntax"], input=source.read_text(encoding="utf-8"), capture_output=True,
                            text=True, timeout=120)
    lines = result.stdout.splitlines()
    if lines[:1] != ["ERROR"]:
        return ""
    line = int(lines[1]) + 1 if len(lines) > 1 and lines[1].isdigit() else "?"  # -syntax counts from 0
    return f"{rel(source)}:{line}: {' '.join(lines[2:]) or 'syntax error'}"


def test_every_diagram_parses():
    tool = plantuml()
    sources = sorted(DIAGRAM_DIR.glob("*.puml"))
    result = subprocess.run([tool, "-checkonly", *map(str, sources)], capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        where = [error for source in sources if (error := syntax_error(tool, source))]
        pytest.fail(f"plantuml -checkonly failed (exit {result.returncode}):\n" + "\n".join(where)
                    + f"\n{result.stdout}{result.stderr}")


@pytest.mark.parametrize("source", sorted(DIAGRAM_DIR.glob("*.puml")), ids=lambda p: p.name)
def test_diagram_output_name_is_its_file_name(source: Path):
    """`@startuml NAME` names the PNG: it must land beside the source, as <stem>.png."""
    first = next(line for line in source.read_text(encoding="utf-8").splitlines() if line.strip())
    assert first.split() in (["@startuml"], ["@startuml", source.stem]), f"{rel(source)} starts with {first!r}"


def png_text_chunks(path: Path) -> dict[str, str]:
    """The tEXt/iTXt/zTXt chunks of a PNG, checked against their CRCs."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{rel(path)} is not a PNG"
    chunks: dict[str, str] = {}
    offset = 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{rel(path)}: chunk {kind!r} is corrupt"
        if kind == b"iTXt":
            keyword, rest = body.split(b"\0", 1)
            compressed, rest = rest[0], rest[2:]
            _language, rest = rest.split(b"\0", 1)
            _translated, text = rest.split(b"\0", 1)
            chunks[keyword.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode("utf-8")
        elif kind == b"tEXt":
            keyword, text = body.split(b"\0", 1)
            chunks[keyword.decode("latin-1")] = text.decode("latin-1")
        elif kind == b"zTXt":
            keyword, rest = body.split(b"\0", 1)
            chunks[keyword.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
        if kind == b"IEND":
            break
        offset += 12 + length
    return chunks


def diagram_lines(text: str) -> list[str]:
    """A diagram's source as PlantUML embeds it: CRLF to LF, trailing blanks and comment lines dropped,
    up to @enduml (after which PlantUML appends its version)."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.lstrip().startswith("'"):
            continue
        lines.append(line.rstrip())
        if line.strip() == "@enduml":
            break
    return lines


@pytest.mark.parametrize("source", sorted(DIAGRAM_DIR.glob("*.puml")), ids=lambda p: p.name)
def test_png_embeds_the_current_source(source: Path):
    png = source.with_suffix(".png")
    hint = "run scripts/render-diagrams.sh and commit the PNG"
    assert png.is_file(), f"{rel(png)} is missing: {hint}"
    embedded = png_text_chunks(png).get("plantuml")
    assert embedded is not None, f"{rel(png)} carries no PlantUML source (rendered without it?): {hint}"
    ours, theirs = diagram_lines(source.read_text(encoding="utf-8")), diagram_lines(embedded)
    diff = "\n".join(list(difflib.unified_diff(theirs, ours, "in the PNG", "in the .puml", lineterm=""))[:40])
    assert ours == theirs, f"{rel(png)} is stale: {hint}\n{diff}"


def test_architecture_shows_the_storage_paths():
    text = (DIAGRAM_DIR / "architecture.puml").read_text(encoding="utf-8")
    wanted = [f.env for f in FIELDS if f.path] + [
        "merged-model.versions/", ".merged-model.lock", ".lora-adapter.lock", "COMPLETE.json", "run.json"]
    assert [w for w in wanted if w not in text] == []


def test_workflow_shows_every_exit_code():
    text = (DIAGRAM_DIR / "workflow.puml").read_text(encoding="utf-8")
    assert [int(code) for code in ExitCode if f"exit {int(code)}" not in text] == []


# ---------------------------------------------------------------------------------------------------------
# invoke tasks

def run_invoke(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"invoke {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def task_options(help_text: str) -> set[str]:
    """Options of one task from `invoke --help TASK` (the part after "Options:")."""
    section = help_text.split("\nOptions:", 1)[1] if "\nOptions:" in help_text else ""
    options = {"-h", "--help"}
    for line in section.splitlines():
        for short in re.findall(r"(?:^|[\s,])(-[A-Za-z0-9])\b(?!-)", line):
            options.add(short)
        for negatable, name in re.findall(r"--(\[no-\])?([A-Za-z0-9][\w-]*)", line):
            options.add(f"--{name}")
            if negatable:
                options.add(f"--no-{name}")
    return options


@cache
def invoke_tasks() -> frozenset[str]:
    listing = json.loads(run_invoke("--list", "--list-format=json"))

    def names(collection: dict, prefix: str = "") -> Iterator[str]:
        for task in collection.get("tasks", []):
            yield prefix + task["name"]
            for alias in task.get("aliases", []):
                yield prefix + alias
        for sub in collection.get("collections", []):
            yield from names(sub, f"{prefix}{sub['name']}.")

    return frozenset(names(listing))


@cache
def invoke_task_options(task: str) -> frozenset[str]:
    return frozenset(task_options(run_invoke("--help", task)))


@cache
def invoke_core_options() -> frozenset[str]:
    return frozenset(task_options("\nOptions:\n" + run_invoke("--help").split("Core options:", 1)[-1]))


def test_docs_name_invoke_commands():
    assert sum(len(invoke_commands(p.read_text(encoding="utf-8"))) for p in doc_files()) >= 10, (
        "the docs should show the invoke tasks; the extraction found almost none")


def test_invoke_commands_in_the_docs_exist():
    if not (REPO / "tasks.py").is_file():
        pytest.fail("tasks.py is missing: the docs name invoke tasks, and they are checked against "
                    "`invoke --list` and `invoke --help TASK`")
    problems = []
    for path in doc_files():
        for command in invoke_commands(path.read_text(encoding="utf-8")):
            where = f"{rel(path)}:{command.line}: `{command.text}`"
            problems += [f"{where}: invoke has no option {o}" for o in command.core_options
                         if o not in invoke_core_options()]
            if command.task is None:
                continue
            if command.task not in invoke_tasks():
                problems.append(f"{where}: no task {command.task!r} (tasks: {', '.join(sorted(invoke_tasks()))})")
                continue
            allowed = invoke_task_options(command.task)
            problems += [f"{where}: task {command.task} has no option {o} (it has {', '.join(sorted(allowed))})"
                         for o in command.options if o not in allowed]
    assert problems == [], "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# python -m entrypoint, settings, links, exit codes

def entrypoint_options() -> dict[str, set[str]]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(parser._option_string_actions) for name, parser in sub.choices.items()}


def test_entrypoint_commands_in_the_docs_exist():
    options = entrypoint_options()
    problems, seen = [], 0
    for path in doc_files():
        for command in entrypoint_commands(path.read_text(encoding="utf-8")):
            seen += 1
            where = f"{rel(path)}:{command.line}"
            if not command.commands:
                problems.append(f"{where}: `python -m entrypoint` without a command")
            for name in command.commands:
                if name not in COMMANDS:
                    problems.append(f"{where}: no command {name!r} (commands: {', '.join(COMMANDS)})")
                    continue
                problems += [f"{where}: command {name} has no option {o}" for o in command.options
                             if o not in options[name]]
    assert seen >= 5, "the docs should show the entrypoint's commands; the extraction found almost none"
    assert problems == [], "\n".join(problems)


def test_settings_named_in_the_docs_exist():
    problems, seen = [], 0
    for path in doc_files():
        for line, name in setting_names(path.read_text(encoding="utf-8")):
            seen += 1
            if name not in FIELDS_BY_ENV:
                problems.append(f"{rel(path)}:{line}: {name} is not a setting (entrypoint/settings.py FIELDS); "
                                "if it is not meant as one, add it to NOT_SETTINGS in tests/test_docs.py")
    assert seen >= 20, "the docs should name settings; the extraction found almost none"
    assert problems == [], "\n".join(problems)


def test_relative_links_resolve():
    problems = []
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        for line, target in links(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{rel(path)}:{line}: ({target})"
            if not linked.is_relative_to(REPO):
                problems.append(f"{where} leaves the repository")
            elif not linked.exists():
                problems.append(f"{where}: {file_part} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text("utf-8")):
                problems.append(f"{where}: {linked.name} has no heading #{anchor}")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("doc", [REPO / "README.md", GUIDE], ids=lambda p: p.name)
def test_exit_code_tables_cover_the_contract(doc: Path):
    text = doc.read_text(encoding="utf-8")
    missing = [int(code) for code in ExitCode if not re.search(rf"^\|\s*{int(code)}\s*\|", text, re.MULTILINE)]
    assert missing == [], f"{rel(doc)} has no table row for exit code(s) {missing}"
