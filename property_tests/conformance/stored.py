"""Did what the brain acknowledged land in its store, once and as sent?

Both protocols promise the same thing of an acknowledged record, so both
machines check it here, through the ``stored_events`` hook. JSON numbers
are compared by value (``1e16`` and ``10000000000000000`` are one number:
Postgres' jsonb keeps the value, not the spelling).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from .target import Hooks, Timeouts, wait_for

__all__ = ["landing_problem", "same_json", "settle"]


def _by_value(value: Any) -> Any:
    return json.loads(json.dumps(value), parse_float=Decimal, parse_int=Decimal)


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value, whatever their spelling."""
    return bool(_by_value(a) == _by_value(b))


def settle(hooks: Hooks, stored: Callable[[], list[Any]], timeouts: Timeouts) -> None:
    """Wait until nothing more is on its way to the store: by the hook, or by quiet.

    Without a ``drained`` hook, "settled" means ``stored()`` kept its length
    for ``timeouts.quiet`` seconds: a late duplicate may still land after
    that, so a brain with such a hook is checked more strictly.
    """
    if hooks.drained is not None:
        wait_for(hooks.drained, timeouts.stored, 0.02)
        return
    before = len(stored())
    while True:
        time.sleep(timeouts.quiet)
        now = len(stored())
        if now == before:
            return
        before = now


def landing_problem(
    hooks: Hooks,
    timeouts: Timeouts,
    *,
    key: str,
    prefix: str,
    sent: dict[str, dict[str, Any]],
    acked: set[str],
) -> str | None:
    """What is wrong with how the records named by ``key`` landed; None if nothing.

    ``sent`` maps every record sent (acknowledged or not) by its ``key``
    field, which starts with ``prefix``; ``acked`` are those acknowledged.
    """
    stored_events = hooks.stored_events
    assert stored_events is not None

    def ours() -> list[dict[str, Any]]:
        return [e for e in stored_events() if str(e.get(key, "")).startswith(prefix)]

    if hooks.drained is None:  # no way to know when it is done: wait for what must come
        wait_for(lambda: acked <= {e[key] for e in ours()}, timeouts.stored, 0.02)
    settle(hooks, ours, timeouts)
    stored = ours()
    counts = Counter(e[key] for e in stored)
    twice = sorted(k for k, n in counts.items() if n > 1)
    if twice:
        return f"stored more than once: {twice[:5]}"
    missing = sorted(acked - set(counts))
    if missing:
        return f"acknowledged but not stored: {missing[:5]}"
    for event in stored:
        record = sent.get(event[key])
        if record is None:
            return f"stored something never sent: {event!r}"
        changed = sorted(k for k, v in record.items() if not same_json(event.get(k), v))
        if changed:
            return f"{event[key]} stored with {changed} changed: sent {record!r}, stored {event!r}"
    return None
