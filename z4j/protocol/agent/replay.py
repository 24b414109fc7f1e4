"""The replay guard: one per session and direction.

A signed frame is accepted only if its ``ts`` is within ±60 s of now, its
``seq`` is strictly greater than the last accepted one, and its nonce was
not seen in the last 180 s. State changes only once every check passed, so
a rejected frame cannot poison the guard.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime

from ..close import CloseCode
from ..errors import RemoteProtocolError

__all__ = ["ReplayGuard", "parse_ts"]

TS_WINDOW_SECONDS = 60.0
NONCE_TTL_SECONDS = 180.0
MAX_NONCES = 4096
MAX_NONCE_LENGTH = 32


def _reject(message: str, reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason=reason, close_code=CloseCode.FORBIDDEN)


def parse_ts(value: object) -> float:
    """Seconds since the epoch of an ISO-8601 timestamp that names its zone."""
    if not isinstance(value, str):
        raise _reject("ts must be an ISO-8601 string", "bad_ts")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _reject(f"ts {value[:40]!r} is not ISO-8601", "bad_ts") from None
    if parsed.tzinfo is None:
        raise _reject("ts must carry a timezone", "bad_ts")
    return parsed.timestamp()


class ReplayGuard:
    def __init__(
        self,
        *,
        window: float = TS_WINDOW_SECONDS,
        nonce_ttl: float = NONCE_TTL_SECONDS,
        max_nonces: int = MAX_NONCES,
    ) -> None:
        self._window = window
        self._nonce_ttl = nonce_ttl
        self._max_nonces = max_nonces
        self.last_seq = 0
        self._nonces: OrderedDict[str, float] = OrderedDict()  # nonce -> expiry

    def check(self, *, seq: object, nonce: object, ts: object, now: float) -> None:
        """Accept the frame's replay fields or raise `RemoteProtocolError` (4403)."""
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise _reject("seq must be an integer >= 1", "bad_seq")
        if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE_LENGTH:
            raise _reject(
                f"nonce must be a string of 1 to {MAX_NONCE_LENGTH} characters", "bad_nonce"
            )
        sent_at = parse_ts(ts)
        if abs(now - sent_at) > self._window:
            raise _reject(
                f"ts is {now - sent_at:+.0f}s off (window ±{self._window:g}s)", "stale_ts"
            )
        if seq <= self.last_seq:
            raise _reject(f"seq {seq} after {self.last_seq}: not increasing", "seq_not_increasing")
        self._forget_expired(now)
        if nonce in self._nonces:
            raise _reject("nonce was used before", "nonce_reused")
        self.last_seq = seq
        self._nonces[nonce] = now + self._nonce_ttl
        while len(self._nonces) > self._max_nonces:
            self._nonces.popitem(last=False)

    def _forget_expired(self, now: float) -> None:
        while self._nonces:
            nonce, expiry = next(iter(self._nonces.items()))
            if expiry > now:
                return
            del self._nonces[nonce]
