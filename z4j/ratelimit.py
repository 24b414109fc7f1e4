"""Token buckets for per-connection rate limits (sans-IO: the caller brings the clock).

A bucket holds at most ``rate`` tokens (one second's worth) and refills at
``rate`` per second, so a peer may burst up to a second's budget and keep
up the rate indefinitely, but no more.
"""

from __future__ import annotations

import attrs

__all__ = ["TokenBucket"]


@attrs.define
class TokenBucket:
    rate: float
    tokens: float = attrs.field(default=attrs.Factory(lambda self: self.rate, takes_self=True))
    last: float | None = None

    def take(self, count: float, now: float) -> bool:
        """Spend ``count`` tokens at time ``now``; False (and nothing spent) if short."""
        if self.last is not None:
            self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if count > self.tokens:
            return False
        self.tokens -= count
        return True
