"""Text an agent chose, made safe for a text log line.

Worker ids, host names, error codes and messages come from the agent; put
into a log line as they are, a newline or a terminal escape in them forges
lines an operator (or a log shipper) reads as the brain's own.
"""

from __future__ import annotations

__all__ = ["loggable"]

LOG_TEXT_LIMIT = 200


def loggable(value: object, limit: int = LOG_TEXT_LIMIT) -> str:
    """``value`` as one quoted line: control characters escaped, at most ``limit``
    characters of it kept (the rest counted, not shown)."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit
    shown = repr(text[:limit]) if cut > 0 else repr(text)
    return f"{shown}…(+{cut} chars)" if cut > 0 else shown
