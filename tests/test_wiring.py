"""The wiring rules, executable (docs/architecture.md, "Wiring rules").

A service is finished when its constructor returns, services never import
services, and they meet only in the composition root (`z4j.brain`). These
tests read the source: they fail on the first import or assignment that
would hide a cycle again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import z4j

PACKAGE = Path(z4j.__file__).parent

# Modules holding a service: something with tasks of its own (a `run` or
# `serve`), or an endpoint the HTTP server hands connections to. The small
# objects they share live in z4j.links; resources (buffer, store), the
# protocol core and the HTTP application's parts (api, auth) are not
# services and may be imported by them.
SERVICES = frozenset(
    {
        "agent_endpoint",
        "commands",
        "dashboard_hub",
        "drain",
        "heartbeat",
        "http",
        "ingest_server",
        "maintenance",
        "registry",
    }
)
ROOT = "brain"


def _imported_modules(path: Path) -> set[str]:
    """Top-level z4j module names that ``path`` imports (relative or absolute)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.startswith("z4j."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("z4j."):
                    found.add(alias.name.split(".")[1])
    return found


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_a_service_imports_no_other_service(service: str) -> None:
    imported = _imported_modules(PACKAGE / f"{service}.py") & SERVICES - {service}
    assert not imported, f"z4j.{service} imports the services {sorted(imported)}: give it a link"


def test_every_listed_service_exists() -> None:
    assert all((PACKAGE / f"{name}.py").is_file() for name in SERVICES | {ROOT})


def test_the_root_assigns_no_attribute_after_construction() -> None:
    """``x.hook = ...`` in the composition root would finish a service late."""
    tree = ast.parse((PACKAGE / f"{ROOT}.py").read_text())
    late = [
        f"line {node.lineno}: {ast.unparse(target)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute)
    ]
    assert not late, late


@pytest.mark.parametrize("module", sorted(SERVICES | {ROOT, "links"}))
def test_no_attribute_is_typed_any(module: str) -> None:
    """`Any` standing for a collaborator hides it from mypy."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    vague = [
        f"line {node.lineno}: {ast.unparse(node.target)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Attribute)
        and "Any" in ast.unparse(node.annotation).replace("dict[str, Any]", "")
    ]
    assert not vague, vague
