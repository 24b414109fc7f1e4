"""When an agent event happened, as the brain files it.

An agent event is filed under its own ``occurred_at`` when that is a sane
timestamp, not under the time it reached us: agents re-send a batch they saw
no acknowledgement for, and Postgres finds a duplicate only within one
partition (z4j.events). The task projection orders events by the same time
(z4j.tasks), so both agree on when an event happened.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["MAX_CLOCK_SKEW_SECONDS", "filing", "filing_time"]

# An occurred_at further than this from its receipt is not trusted for
# filing; the receipt time is used instead.
MAX_CLOCK_SKEW_SECONDS = 7 * 86400


def filing_time(occurred_at: object, received_at: float) -> datetime:
    """occurred_at when it is a sane timestamp (naive means UTC), else receipt time."""
    return filing(occurred_at, received_at)[0]


def filing(occurred_at: object, received_at: float) -> tuple[datetime, float]:
    """`filing_time`, and the same as epoch seconds (the drain wants both)."""
    if isinstance(occurred_at, str):
        try:
            when = datetime.fromisoformat(occurred_at.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            at = when.timestamp()
            if abs(at - received_at) <= MAX_CLOCK_SKEW_SECONDS:
                return when, at
    when = datetime.fromtimestamp(received_at, UTC)
    return when, when.timestamp()  # to the microsecond, as the datetime has it
