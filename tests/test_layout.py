"""The layout's rules, executable (docs/architecture.md, "Where does my change go").

What is public, what may import what, and how long a module may grow
before it must say why: each rule reads the source, so a change that
breaks one fails here rather than in review.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import z4j

PACKAGE = Path(z4j.__file__).parent
REPO = PACKAGE.parent

# What users may import; everything else is internal (z4j/brain/__init__.py).
PUBLIC_MODULES = ("z4j", "z4j.agent", "z4j.ingest", "z4j.testing")
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _is_public(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PUBLIC_MODULES[1:]) or (
        module == "z4j"
    )


def _user_facing_code() -> list[tuple[str, str]]:
    """(where, source) of every example and every Python block in README and docs."""
    found = [(str(p.relative_to(REPO)), p.read_text()) for p in (REPO / "examples").glob("*.py")]
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)):
            found.append((f"{doc.relative_to(REPO)} block {i + 1}", block))
    return found


@pytest.mark.parametrize(("where", "source"), _user_facing_code(), ids=lambda v: str(v)[:40])
def test_users_are_shown_only_public_modules(where: str, source: str) -> None:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        pytest.skip("a fragment, not a program")
    # z4j_bare, z4j_core: the agent packages, not ours.
    ours = [m for m in _imports(tree) if m == "z4j" or m.startswith("z4j.")]
    internal = sorted(m for m in ours if not _is_public(m))
    assert not internal, f"{where} imports internal modules {internal}"


def test_the_user_facing_code_is_found() -> None:
    """The rule above reads something: the examples and the README's client."""
    wheres = [where for where, _ in _user_facing_code()]
    assert any(w.startswith("examples/") for w in wheres)
    assert any(w.startswith("README.md") for w in wheres)


def test_the_brain_package_says_it_is_internal() -> None:
    assert z4j.brain.__doc__ is not None and "Internal." in z4j.brain.__doc__


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_long_module_says_which_concern_justifies_it(path: Path) -> None:
    """Past 700 lines a module must say, in its docstring, why it is one concern."""
    if len(path.read_text().splitlines()) <= 700:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert re.search(r"one concern|single concern", doc, re.I), (
        f"{path.relative_to(PACKAGE)} is over 700 lines: say in its docstring which "
        "single concern justifies the length, or split it"
    )


SANS_IO = ("trio", "socket", "sqlite3", "psycopg", "hypercorn", "ssl", "asyncio")


@pytest.mark.parametrize("path", sorted((PACKAGE / "protocol").rglob("*.py")), ids=lambda p: p.name)
def test_protocol_modules_do_no_io(path: Path) -> None:
    """`z4j.protocol` is sans-IO: bytes in, events out; no loop, sockets or SQL."""
    banned = {m for m in _imports(ast.parse(path.read_text())) if m.split(".")[0] in SANS_IO}
    assert not banned, f"{path.relative_to(PACKAGE)} imports {sorted(banned)}"
