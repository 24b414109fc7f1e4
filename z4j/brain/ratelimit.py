"""Rate limits, sans-IO (the caller brings the clock).

`TokenBucket`, for per-connection rates: a bucket holds at most ``rate``
tokens (one second's worth) and refills at ``rate`` per second, so a peer
may burst up to a second's budget and keep up the rate indefinitely, but no
more.

`FailureThrottle`, for guessing: failures per source (a wrong ingest token,
a failed sign-in) in a window, and a block once there are too many.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import attrs

__all__ = ["FailureThrottle", "TokenBucket"]


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


class FailureThrottle:
    """Failures per source: ``max_failures`` within ``window`` seconds of the
    first refuse the source until its block ends.

    The block ends ``block`` seconds after the failure that filled the
    window or, with ``block`` None, when that window ends. At most
    ``max_sources`` are tracked, the least recently failed forgotten first,
    so a flood from many addresses costs bounded memory (and weakens the
    throttle, never the brain).
    """

    def __init__(
        self,
        *,
        max_failures: int,
        window: float,
        block: float | None = None,
        max_sources: int = 4096,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.block = block
        self.max_sources = max_sources
        # source -> (window start, failures in it, refused until)
        self._sources: OrderedDict[str, tuple[float, int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def refused_for(self, source: str, now: float) -> float:
        """Seconds until ``source`` may try again; 0 if it may now."""
        entry = self._sources.get(source)
        if entry is None:
            return 0.0
        since, _, until = entry
        if now >= until and now - since >= self.window:
            del self._sources[source]  # nothing left to remember
            return 0.0
        return max(0.0, until - now)

    def failed(self, source: str, now: float) -> int:
        """Count a failure at ``now``; the failures in its window, this one
        included (``max_failures`` when this one starts a block)."""
        since, count, until = self._sources.pop(source, (now, 0, 0.0))
        if now - since > self.window:
            since, count = now, 0
        count += 1
        failures = count
        if count >= self.max_failures:
            until = now + self.block if self.block is not None else since + self.window
            # The next failure, after the block, opens a window of its own.
            since, count = -math.inf, 0
        self._sources[source] = (since, count, until)  # now the most recent
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        return failures

    def forgive(self, source: str) -> None:
        self._sources.pop(source, None)
