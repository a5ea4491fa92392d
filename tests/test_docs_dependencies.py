"""docs/diagrams/dependencies.puml shows the entrypoint's modules and their imports as the code has them.

Solid arrows are imports at module load, dashed ones imports inside a function (the heavy or optional ones
that the skip path and --help never pay for). Imports only for type checking and imports of `errors` (used
by nearly every module, shown once as a note in the diagram) are left out. The CLI reaches the command
modules through its COMMANDS table, which the diagram shows as dashed arrows too.
"""

from __future__ import annotations

import ast
import re

from helpers import REPO

from entrypoint.cli import COMMANDS

PACKAGE = REPO / "entrypoint"
DIAGRAM = REPO / "docs" / "diagrams" / "dependencies.puml"
LEFT_OUT = {"errors"}


def modules() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


def _imported(node: ast.AST, known: set[str]) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "entrypoint":
        names = [a.name for a in node.names] if node.module == "entrypoint" else [node.module.split(".")[1]]
    elif isinstance(node, ast.Import):
        names = [a.name.split(".")[1] for a in node.names if a.name.startswith("entrypoint.")]
    else:
        return []
    return [n for n in names if n in known]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def code_edges() -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(module-level imports, imports inside functions) between the package's modules."""
    known = modules()
    solid: set[tuple[str, str]] = set()
    deferred: set[tuple[str, str]] = set()
    for name in sorted(known):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
        top = {t for node in tree.body for t in _imported(node, known)}
        runtime = set()
        stack = [n for n in tree.body if not _is_type_checking(n)]
        while stack:
            node = stack.pop()
            runtime.update(_imported(node, known))
            stack.extend(child for child in ast.iter_child_nodes(node) if not _is_type_checking(child))
        solid |= {(name, t) for t in top - LEFT_OUT if t != name}
        deferred |= {(name, t) for t in runtime - top - LEFT_OUT if t != name}
    deferred |= {("cli", module.split(".")[1]) for _, module in COMMANDS.values() if module}
    return solid, deferred


def diagram_edges(arrow: str) -> set[tuple[str, str]]:
    known = modules()
    pattern = re.compile(rf"^\s*(\w+)\s+{re.escape(arrow)}\s+(\w+)\b", re.M)
    found = pattern.findall(DIAGRAM.read_text(encoding="utf-8"))
    return {(a, b) for a, b in found if a in known and b in known}


def test_every_module_is_in_the_diagram():
    text = DIAGRAM.read_text(encoding="utf-8")
    aliases = set(re.findall(r'^\s*rectangle\s+"[^"]*"\s+as\s+(\w+)', text, re.M))
    assert modules() - aliases == set(), "add a rectangle for each new module of entrypoint/"


def test_the_diagram_shows_the_imports_the_code_has():
    solid, deferred = code_edges()
    shown_solid, shown_deferred = diagram_edges("-->"), diagram_edges("..>")
    assert (sorted(solid - shown_solid), sorted(shown_solid - solid)) == ([], []), "module-level imports"
    assert (sorted(deferred - shown_deferred), sorted(shown_deferred - deferred)) == ([], []), "deferred imports"
