"""The agent's reconnect policy: why a session ended, and how long to wait (sans-IO).

Kept apart so the policy reads in one place and needs no socket to test:
a session's end is classified (`Kind`) from the close code, the HTTP status
or a fatal ``error`` frame; each kind has its own capped, fully jittered
`Backoff`; and the failure counter resets only after a healthy session (one
that stayed open for a heartbeat interval), so a brain that accepts the hello
and then drops us at once is not hammered at the base delay.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Final

import attrs

from ..protocol.close import Retry, retry_after

__all__ = [
    "AUTH_BACKOFF",
    "INCOMPATIBLE_BACKOFF",
    "INCOMPATIBLE_ERRORS",
    "TRANSIENT_BACKOFF",
    "Backoff",
    "End",
    "Kind",
    "Reconnects",
    "classify_close",
]

#: Codes of fatal ``error`` frames that mean "this agent is too old or too new".
INCOMPATIBLE_ERRORS: Final = frozenset(
    {"agent_incompatible", "protocol_incompatible", "scheduler_upgrade_required"}
)


@attrs.frozen(kw_only=True)
class Backoff:
    """Capped exponential backoff with full jitter.

    The wait before retry number ``attempt`` (0 for the first) is
    ``rand * min(cap, base * 2**attempt)``, ``rand`` uniform in [0, 1).
    """

    base: float = attrs.field(default=0.5, validator=attrs.validators.gt(0))
    cap: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.base * 2.0 ** min(attempt, 64))

    def delay(self, attempt: int, rand: float) -> float:
        return rand * self.ceiling(attempt)


#: The defaults of `Agent`: transient failures, refused credentials, a protocol mismatch.
TRANSIENT_BACKOFF: Final = Backoff()
AUTH_BACKOFF: Final = Backoff(base=10.0, cap=600.0)
INCOMPATIBLE_BACKOFF: Final = Backoff(base=120.0, cap=3600.0)


class Kind(enum.Enum):
    TRANSIENT = "transient"
    AUTH = "auth"
    INCOMPATIBLE = "incompatible"
    STOPPED = "stopped"


@attrs.frozen(kw_only=True)
class End:
    """Why a session ended, and the close code to send (None: nothing to send)."""

    kind: Kind
    detail: str
    close_code: int | None = None
    healthy: bool = False  # stayed open for a heartbeat interval: reset the backoff


_KIND_OF: Final = {
    Retry.TRANSIENT: Kind.TRANSIENT,
    Retry.AUTH: Kind.AUTH,
    Retry.INCOMPATIBLE: Kind.INCOMPATIBLE,
}


def classify_close(code: int, *, handshake: bool) -> Kind:
    return _KIND_OF[retry_after(code, handshake=handshake)]


class Reconnects:
    """The wait after each failed session of one `Agent.run`."""

    def __init__(self, backoffs: Mapping[Kind, Backoff], random: Callable[[], float]) -> None:
        self._backoffs = backoffs
        self._random = random
        self.attempt = 0  #: consecutive failures since the last healthy session

    def delay(self, end: End) -> float:
        if end.healthy:
            self.attempt = 0
        delay = self._backoffs[end.kind].delay(self.attempt, self._random())
        self.attempt += 1
        return delay
