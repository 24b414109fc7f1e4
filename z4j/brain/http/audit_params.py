"""The filters of ``GET /api/v1/audit``, read from its query string.

``actor``, ``action`` and ``subject`` match exactly; an ``action`` or
``subject`` ending in ``*`` matches as a prefix (``dead_letter.*``).
``outcome`` is ``ok`` or ``refused``; ``project_id`` a project's id;
``since`` and ``until`` ISO-8601 or epoch seconds (``until`` excluded).
Each value is bounded, so a hostile query gets a 400, never a big scan key.
"""

from __future__ import annotations

from typing import Literal, cast

from ...store.audit_query import OUTCOMES, AuditFilter
from ._request import ApiError, time_param, uuid_param
from .limits import FILTER_TEXT_CHARS

__all__ = ["MAX_FILTER_CHARS", "audit_filter"]

MAX_FILTER_CHARS = FILTER_TEXT_CHARS


def audit_filter(q: dict[str, str]) -> AuditFilter:
    def text(name: str) -> tuple[str | None, bool]:
        raw = q.get(name)
        if raw is None:
            return None, False
        prefix = name != "actor" and raw.endswith("*")
        value = raw[:-1] if prefix else raw
        if prefix and not value:
            return None, False  # "*": any
        if not value or len(value) > MAX_FILTER_CHARS or "\x00" in value:
            raise ApiError(
                400, "bad_request", f"{name}: 1 to {MAX_FILTER_CHARS} characters (no NUL)"
            )
        return value, prefix

    outcome = q.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise ApiError(400, "bad_request", f"outcome: one of {', '.join(OUTCOMES)}")
    action, action_prefix = text("action")
    subject, subject_prefix = text("subject")
    return AuditFilter(
        actor=text("actor")[0],
        action=action,
        action_prefix=action_prefix,
        subject=subject,
        subject_prefix=subject_prefix,
        outcome=cast(Literal["ok", "refused"] | None, outcome),
        project_id=uuid_param(q["project_id"], "project_id") if "project_id" in q else None,
        since=time_param(q["since"], "since") if "since" in q else None,
        until=time_param(q["until"], "until") if "until" in q else None,
    )
