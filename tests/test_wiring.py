"""The wiring rules, executable (docs/architecture.md, "Wiring rules").

A service is finished when its constructor returns, services never import
services, and they meet only in the composition root (`z4j.brain._root`). These
tests read the source: they fail on the first import or assignment that
would hide a cycle again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import z4j

PACKAGE = Path(z4j.__file__).parent

# Modules holding a service (dotted under z4j.brain): something with tasks
# of its own (a `serve`), or an endpoint the HTTP server hands connections
# to. The small objects they share live in z4j.brain.links; resources
# (buffer, store), the protocol core and the HTTP application's parts (api,
# auth) are not services and may be imported by them.
SERVICES = frozenset(
    {
        "agents",
        "commands",
        "dashboard_hub",
        "drain",
        "heartbeat",
        "http.server",
        "ingest",
        "maintenance",
        "read_replica",
        "reconciler",
        "registry",
        "rollouts",
        "schedule_streams",
    }
)
ROOT = "_root"


def _path(module: str) -> Path:
    return PACKAGE / "brain" / (module.replace(".", "/") + ".py")


def _imported_modules(module: str) -> set[str]:
    """Dotted names under z4j.brain that ``module`` imports, however spelled."""
    package = ["z4j", "brain", *module.split(".")[:-1]]
    found: set[str] = set()
    for node in ast.walk(ast.parse(_path(module).read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                absolute = ".".join(base + ([node.module] if node.module else []))
            else:
                absolute = node.module or ""
            # `from . import x` names modules; `from .x import y` names one.
            found.add(absolute)
            found.update(f"{absolute}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name.removeprefix("z4j.brain.") for name in found if name.startswith("z4j.brain.")}


BRAIN_MODULES = sorted(
    ".".join(path.relative_to(PACKAGE / "brain").with_suffix("").parts)
    for path in (PACKAGE / "brain").rglob("*.py")
    if path.name != "__init__.py"
)


@pytest.mark.parametrize("module", [m for m in BRAIN_MODULES if m != ROOT])
def test_only_the_root_imports_a_service(module: str) -> None:
    """Services import no service, and neither does what they are built from
    (the API takes a `CommandDesk`, /metrics reads `HttpStats`): only the
    composition root meets them all."""
    imported = _imported_modules(module) & SERVICES - {module}
    assert not imported, (
        f"z4j.brain.{module} imports the services {sorted(imported)}: give it a link"
    )


def test_the_rule_sees_every_spelling_of_an_import() -> None:
    """The check itself: `from .x import`, `from ..x import`, `from . import x`."""
    assert _imported_modules(ROOT) >= SERVICES  # `from .agents import ...`, `from .http.server ...`
    assert "links" in _imported_modules("http.api")  # `from ..links import ...`
    assert "links" in _imported_modules("commands")


def test_every_listed_service_exists() -> None:
    assert all(_path(name).is_file() for name in SERVICES | {ROOT})


def test_the_root_assigns_no_attribute_after_construction() -> None:
    """``x.hook = ...`` in the composition root would finish a service late."""
    tree = ast.parse(_path(ROOT).read_text())
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
    tree = ast.parse(_path(module).read_text())
    vague = [
        f"line {node.lineno}: {ast.unparse(node.target)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Attribute)
        and "Any" in ast.unparse(node.annotation).replace("dict[str, Any]", "")
    ]
    assert not vague, vague
