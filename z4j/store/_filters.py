"""WHERE clauses for the list queries, built once for both stores.

Only the conditions asked for are written (no ``%s IS NULL OR …``), so
Postgres needs no casts to type a NULL parameter and both planners see
plain predicates. Values are converted with the store's `Dialect`.
"""

from __future__ import annotations

import uuid
from typing import Any

from ._rows import Dialect
from .base import EventFilter

__all__ = ["Where", "agents_where", "commands_where", "events_where", "one_of"]


class Where:
    """An AND of conditions and their parameters, in the order written."""

    def __init__(self, dialect: Dialect) -> None:
        self._d = dialect
        self._terms: list[str] = []
        self.params: list[Any] = []

    def add(self, condition: str, *values: Any) -> Where:
        """``condition`` written with ``?`` placeholders, one per value."""
        self._terms.append(self._d.sql(condition))
        self.params += values
        return self

    def one_of(self, column: str, ids: frozenset[uuid.UUID] | None) -> Where:
        """``column`` is one of ``ids`` (None: no condition; empty: none matches)."""
        if ids is not None:
            condition, values = one_of(self._d, column, ids)
            self._terms.append(condition)
            self.params += values
        return self

    def before(self, first: str, second: str, values: tuple[Any, Any]) -> Where:
        """Rows strictly before ``values`` in (``first``, ``second``) order: a keyset
        page. As a row value, which both stores range-scan an index on the pair
        by; SQLite walks the whole index from the newest for the equivalent OR
        (a page 300,000 events deep: 30 ms against 0.04)."""
        return self.add(f"({first}, {second}) < (?, ?)", *values)

    def __str__(self) -> str:
        return f" WHERE {' AND '.join(self._terms)}" if self._terms else ""


def one_of(d: Dialect, column: str, ids: frozenset[uuid.UUID]) -> tuple[str, list[Any]]:
    """SQL (in ``d``'s placeholders) for ``column`` being one of ``ids``, and its values.

    One id is an equality, which the column's index serves as it does a
    filter by one project; an empty set matches nothing."""
    if not ids:
        return "1 = 0", []
    values = [d.uuid_in(i) for i in sorted(ids)]
    if len(values) == 1:
        return f"{column} = {d.param}", values
    return f"{column} IN ({', '.join([d.param] * len(values))})", values


def events_where(d: Dialect, query: EventFilter) -> Where:
    """Every condition of ``query`` but its text (store/event_search.py) and limit."""
    where = Where(d)
    if query.kind is not None:
        where.add("kind = ?", query.kind)
    if query.project_id is not None:
        where.add("project_id = ?", d.uuid_in(query.project_id))
    where.one_of("project_id", query.projects)
    if query.agent_id is not None:
        where.add("agent_id = ?", d.uuid_in(query.agent_id))
    if query.worker_id is not None:
        where.add("worker_id = ?", query.worker_id)
    if query.task_id is not None:
        where.add(f"{d.json_text('body', 'task_id')} = ?", query.task_id)
    if query.engine is not None:
        where.add(f"{d.json_text('body', 'engine')} = ?", query.engine)
    if query.task_name is not None:
        where.add(f"{d.json_text('body', 'data.task_name')} = ?", query.task_name)
    if query.since is not None:
        where.add("received_at >= ?", d.ts_in(query.since))
    if query.until is not None:
        where.add("received_at < ?", d.ts_in(query.until))
    if query.before is not None:
        where.before("received_at", "id", (d.ts_in(query.before[0]), query.before[1]))
    return where


def commands_where(
    d: Dialect,
    *,
    agent_id: uuid.UUID | None,
    state: str | None,
    before: tuple[float, uuid.UUID] | None,
    projects: frozenset[uuid.UUID] | None = None,
) -> Where:
    where = Where(d)
    if agent_id is not None:
        where.add("agent_id = ?", d.uuid_in(agent_id))
    where.one_of("project_id", projects)
    if state is not None:
        where.add("state = ?", state)
    if before is not None:
        where.before("created_at", "id", (d.ts_in(before[0]), d.uuid_in(before[1])))
    return where


def agents_where(d: Dialect, before: tuple[float, uuid.UUID] | None) -> Where:
    """Agents before ``before`` in (created_at, id) order (agents_by_created)."""
    where = Where(d)
    if before is not None:
        where.before("a.created_at", "a.id", (d.ts_in(before[0]), d.uuid_in(before[1])))
    return where
