"""Decimal numbers from peers' text, without the surprises of ``str.isdigit``.

``"³".isdigit()`` is true but ``int("³")`` raises, and ``int`` refuses strings past
4,300 digits: a check written as ``raw.isdigit() and int(raw)`` turns such input
into an unhandled error (a 500) instead of the 400 it deserves.
"""

from __future__ import annotations

_MOST_DIGITS = 20  # 2**64 has 20 digits; nothing the brain counts needs more


def parse_decimal(raw: str) -> int | None:
    """The value of ``raw`` when it is 1 to 20 ASCII digits, else None."""
    if 0 < len(raw) <= _MOST_DIGITS and raw.isascii() and raw.isdigit():
        return int(raw)
    return None
