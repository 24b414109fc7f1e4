"""Which audit rows to list: the filters of ``GET /api/v1/audit``, for both stores.

Audit rows hold who (``actor``), what (``action``, ``subject``), when
(``at``) and details; routes that record a source and an outcome put them in
the details (``outcome``: ``ok``, or ``refused…`` with the reason). Pages
are keyset pages on ``id`` (newest first), so a filter on an indexed column
(migration 17: actor, action, subject, at) reads a page's worth of rows.
Prefixes are matched with ``substr``, case-sensitively on both stores (a
``LIKE`` would be case-insensitive on SQLite and need escaping).
"""

from __future__ import annotations

import uuid
from typing import Literal

import attrs

from ._filters import Where
from ._rows import Dialect

__all__ = ["OUTCOMES", "AuditFilter", "audit_where"]

OUTCOMES = ("ok", "refused")


@attrs.frozen(kw_only=True)
class AuditFilter:
    """All given conditions hold. ``action`` and ``subject`` match exactly, or
    as a prefix when ``*_prefix`` is set; ``project_id`` matches rows about a
    project (subject ``project:ID``) or naming it in ``details.project_id``."""

    actor: str | None = None
    action: str | None = None
    action_prefix: bool = False
    subject: str | None = None
    subject_prefix: bool = False
    outcome: Literal["ok", "refused"] | None = None
    project_id: uuid.UUID | None = None
    since: float | None = None
    until: float | None = None


def audit_where(d: Dialect, query: AuditFilter, before_id: int | None) -> Where:
    where = Where(d)
    if query.actor is not None:
        where.add("actor = ?", query.actor)
    for column, value, prefix in (
        ("action", query.action, query.action_prefix),
        ("subject", query.subject, query.subject_prefix),
    ):
        if value is None:
            continue
        if prefix:
            where.add(f"substr({column}, 1, ?) = ?", len(value), value)
        else:
            where.add(f"{column} = ?", value)
    if query.outcome is not None:
        outcome = d.json_text("details", "outcome")
        if query.outcome == "ok":
            where.add(f"({outcome} IS NULL OR {outcome} = ?)", "ok")
        else:
            where.add(f"substr({outcome}, 1, 7) = ?", "refused")
    if query.project_id is not None:
        where.add(
            f"(subject = ? OR {d.json_text('details', 'project_id')} = ?)",
            f"project:{query.project_id}",
            str(query.project_id),
        )
    if query.since is not None:
        where.add("at >= ?", d.ts_in(query.since))
    if query.until is not None:
        where.add("at < ?", d.ts_in(query.until))
    if before_id is not None:
        where.add("id < ?", before_id)
    return where
