"""Plans: what a mutating task will do, as data. Printed under --dry-run, asserted by the tests, run otherwise.

A plan is a list of steps (commands as argv lists, files to write) plus checks that must pass before the
first step runs (a missing tool, missing credentials). Nothing here builds shell strings: commands run
with argument lists, and `shlex.join` only formats them for people.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

from invoke.exceptions import Exit

from k8s_tasks.tools import REPO, find_tool, missing_tool_message


@dataclasses.dataclass(frozen=True)
class Command:
    """A command with its arguments; `stdin` is piped to it (a manifest for `kubectl create -f -`)."""

    argv: tuple[str, ...]
    stdin: str | None = None
    stdin_note: str = ""  # what stdin holds, in a few words, for the printed plan

    def display(self) -> str:
        text = shlex.join(self.argv)
        return f"{text}  < {self.stdin_note or 'stdin'}" if self.stdin is not None else text


@dataclasses.dataclass(frozen=True)
class WriteFile:
    """A file the plan writes, relative to the repository root."""

    path: Path
    content: str
    note: str
    mode: int = 0o644
    secret: bool = False  # its content is never printed

    def display(self) -> str:
        return f"write {self.path} (mode {self.mode:o}): {self.note}"


Step = Command | WriteFile
# A check, given the repository root and the environment, returns None when fine, else the message to stop
# with (what is wrong and what to do).
Check = Callable[[Path, Mapping[str, str] | None], str | None]


@dataclasses.dataclass
class Plan:
    title: str
    steps: list[Step]
    checks: list[Check] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def commands(self) -> list[list[str]]:
        """The argv of every command, in order: what the tests assert."""
        return [list(step.argv) for step in self.steps if isinstance(step, Command)]

    def tools(self) -> list[str]:
        return sorted({step.argv[0] for step in self.steps if isinstance(step, Command)})

    def problems(self, root: Path = REPO, environ: Mapping[str, str] | None = None,
                 tools_root: Path = REPO) -> list[str]:
        """What would stop the plan before its first step: missing tools, else the failed checks."""
        missing = [missing_tool_message(tool) for tool in self.tools()
                   if find_tool(tool, environ, tools_root) is None]
        if missing:  # the checks may need those tools themselves
            return missing
        return [message for check in self.checks if (message := check(root, environ)) is not None]

    def describe(self, show_stdin: bool = False) -> str:
        lines = [self.title, *(f"note: {note}" for note in self.notes)]
        for step in self.steps:
            if isinstance(step, WriteFile):
                lines.append(f"  {step.display()}")
                if not step.secret:
                    lines += [f"    | {line}" for line in step.content.splitlines()]
            else:
                lines.append(f"  $ {step.display()}")
                if show_stdin and step.stdin is not None:
                    lines += [f"    | {line}" for line in step.stdin.splitlines()]
        return "\n".join(lines)


# Runs one command (argv, stdin, working directory) and returns its exit code.
Runner = Callable[[list[str], str | None, Path], int]


def subprocess_runner(argv: list[str], stdin: str | None, cwd: Path) -> int:
    """Run a command with the terminal attached (its output streams as it comes); return its exit code."""
    return subprocess.run(argv, input=stdin, text=True, cwd=cwd, check=False).returncode


def run_plan(
    plan: Plan,
    *,
    dry_run: bool,
    root: Path = REPO,
    runner: Runner = subprocess_runner,
    out: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    show_stdin: bool = True,
    tools_root: Path = REPO,
) -> None:
    """Print the plan and stop (dry run), or check its requirements, then run its steps in order.

    Commands run in the repository root, so their relative paths hold wherever invoke was started.
    """
    out = out or sys.stdout
    problems = plan.problems(root, environ, tools_root)
    if dry_run:
        print(plan.describe(show_stdin=show_stdin), file=out)
        for problem in problems:
            print(f"note: a real run would stop before its first step: {problem}", file=out)
        print("(dry run: nothing was run or changed)", file=out)
        return
    if problems:
        raise Exit("\n".join(problems))
    tools = {tool: find_tool(tool, environ, tools_root) or tool for tool in plan.tools()}
    print(plan.title, file=out, flush=True)
    for step in plan.steps:
        print(f"$ {step.display()}", file=out, flush=True)
        if isinstance(step, WriteFile):
            _write(root / step.path, step.content, step.mode)
            continue
        argv = [tools[step.argv[0]], *step.argv[1:]]
        try:
            code = runner(argv, step.stdin, root)
        except KeyboardInterrupt:
            raise Exit(f"interrupted: {shlex.join(step.argv)}", code=130) from None
        if code != 0:
            raise Exit(f"`{shlex.join(step.argv)}` failed with exit code {code}", code=code)


def _write(path: Path, content: str, mode: int) -> None:
    """Write atomically with the final mode from the start (a secret is never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(content)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
